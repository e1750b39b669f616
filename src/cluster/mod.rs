//! Guest clusters: a TOML file names the nodes ([`config`]); `ferry up` gives the cluster a
//! certificate authority and a state directory ([`state`]) and starts one daemon per node
//! ([`daemon`]): the node's VMM, its guest, and an HTTPS API ([`api`]) that the `ferry`
//! command and the other nodes reach ([`client`]). [`control`] is what `up`, `status` and
//! `down` do. Every daemon also serves a [`dashboard`] page and runs the load [`balancer`].
//! [`members`] is the gossip that tells every daemon which nodes make up the
//! cluster; [`join`] adds a node to a running cluster (`ferry join`).

pub mod api;
pub mod balancer;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dashboard;
pub mod join;

pub mod members;
pub mod migrate;
pub mod state;
pub mod tools;
pub mod tools_client;
