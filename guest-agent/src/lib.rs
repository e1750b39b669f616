//! ferry's guest agent.
