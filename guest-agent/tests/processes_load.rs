//! ListProcesses and Load end to end: the host client against the real agent server (a
//! UnixStream pair and loopback TCP), and against fake agents old and new.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_guest_agent::protocol::{Decoder, LoadInfo, Message, MessageType, ProcessList};
use ferry_guest_agent::{Agent, AgentConnection, ClientError, ExecRequest};

const T: Duration = Duration::from_secs(10);

/// How long an answer that should come "at once" may take on a busy two-core machine.
const PROMPT: Duration = Duration::from_secs(2);

fn agent() -> Agent {
    Agent::new(None).with_power_off(Arc::new(|| {}))
}

fn connect(agent: Agent) -> AgentConnection<UnixStream> {
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || agent.serve(guest));
    AgentConnection::handshake(host, T).unwrap()
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

#[test]
fn the_list_holds_this_test_process_with_its_pid_and_cmdline() {
    let mut conn = connect(agent());
    let list = conn.process_list().unwrap();
    assert!(!list.truncated);
    let me = list
        .processes
        .iter()
        .find(|p| p.pid == std::process::id())
        .expect("this process is listed");
    let args: Vec<String> = std::env::args().collect();
    assert_eq!(me.cmdline, args);
    assert_eq!(me.ppid, std::os::unix::process::parent_id());
    // /proc/self belongs to the effective user.
    assert_eq!(me.uid, std::fs::metadata("/proc/self").unwrap().uid());
    // This thread and the agent's connection thread at least.
    assert!(me.threads >= 2, "{me:?}");
    assert!(me.state.is_ascii_uppercase(), "{me:?}");
    assert!(me.rss_kib > 0 && !me.kernel_thread);
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(&me.comm), "{name} vs {}", me.comm);
    assert!(list.processes.windows(2).all(|w| w[0].pid < w[1].pid));
    // processes() is the same list.
    let again = conn.processes().unwrap();
    assert!(again.iter().any(|p| p.pid == std::process::id()));
}

#[test]
fn load_reports_plausible_figures_that_move_forward() {
    let mut conn = connect(agent());
    let a = conn.load().unwrap();
    assert!(a.mem_total_kib > 0, "{a:?}");
    assert!(a.mem_available_kib <= a.mem_total_kib, "{a:?}");
    assert!(a.online_cpus >= 1, "{a:?}");
    assert!(
        a.cpu_total_ticks >= a.cpu_idle_ticks && a.cpu_total_ticks > 0,
        "{a:?}"
    );
    assert!(a.clock_ticks_per_sec > 0 && a.uptime_ms > 0, "{a:?}");
    assert!(a.procs_total >= 1, "{a:?}");
    std::thread::sleep(Duration::from_millis(50));
    let b = conn.load().unwrap();
    assert!(b.uptime_ms >= a.uptime_ms);
    assert!(b.cpu_total_ticks >= a.cpu_total_ticks && b.cpu_idle_ticks >= a.cpu_idle_ticks);
    // Requests of every kind interleave on one connection.
    assert!(conn.ping().is_ok());
    assert!(!conn.processes().unwrap().is_empty());
    assert!(conn.load().is_ok());
}

/// The node daemon's pattern: one long-lived connection polls Load (and lists processes) while
/// another connection runs a command; over TCP with the listener code the agent binary uses.
#[test]
fn a_polling_connection_is_answered_while_another_runs_a_command() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = agent();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let s = s.unwrap();
            agent.spawn_connection(s, "test".into()).unwrap();
        }
    });
    let mut monitor = AgentConnection::handshake(TcpStream::connect(addr).unwrap(), T).unwrap();
    let mut worker = AgentConnection::handshake(TcpStream::connect(addr).unwrap(), T).unwrap();
    let marker = format!("sleep 3; echo ferry-marker-{}", std::process::id());
    let req = sh(&marker);
    let job = std::thread::spawn(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = worker.exec(&req, None, &mut out, &mut err).unwrap();
        (code, out)
    });
    let mut seen = false;
    for _ in 0..10 {
        let start = Instant::now();
        monitor.load().unwrap();
        let procs = monitor.processes().unwrap();
        assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
        seen |= procs.iter().any(|p| p.cmdline.last() == Some(&marker));
        if seen {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen, "the running command is listed with its command line");
    assert!(!job.is_finished());
    let (code, out) = job.join().unwrap();
    assert_eq!(code, 0);
    assert!(String::from_utf8(out).unwrap().starts_with("ferry-marker-"));
}

/// Reads frames from `stream` until `want` says it has all it needs; panics after `limit`.
fn read_until(
    stream: &mut UnixStream,
    dec: &mut Decoder,
    limit: Duration,
    mut want: impl FnMut(&Message) -> bool,
) -> Vec<Message> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 64 * 1024];
    loop {
        while let Some(m) = dec.next().unwrap() {
            let done = want(&m);
            got.push(m);
            if done {
                return got;
            }
        }
        let n = stream.read(&mut buf).expect("an answer in time");
        assert_ne!(n, 0, "the agent hung up");
        dec.push(&buf[..n]);
    }
}

#[test]
fn requests_on_a_connection_running_a_command_are_answered_at_once_and_in_order() {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let agent = agent();
    std::thread::spawn(move || agent.serve(guest));
    let mut dec = Decoder::new();
    let mut frames = Message::Exec(sh("sleep 2; echo done")).encode();
    frames.extend(Message::Load.encode());
    frames.extend(Message::ListProcesses.encode());
    frames.extend(Message::Ping { nonce: 42 }.encode());
    let start = Instant::now();
    host.write_all(&frames).unwrap();
    let got = read_until(&mut host, &mut dec, PROMPT, |m| {
        matches!(m, Message::Pong { .. })
    });
    assert!(start.elapsed() < PROMPT);
    let kinds: Vec<MessageType> = got.iter().map(Message::message_type).collect();
    assert_eq!(
        kinds,
        [
            MessageType::Hello,
            MessageType::LoadReport,
            MessageType::Processes,
            MessageType::Pong
        ]
    );
    // The command goes on and finishes normally.
    let rest = read_until(&mut host, &mut dec, T, |m| {
        matches!(m, Message::Exited { .. })
    });
    assert_eq!(rest.last(), Some(&Message::Exited { code: 0 }));
    assert!(rest.contains(&Message::Stdout(b"done\n".to_vec())));
}

#[test]
fn the_agent_answers_an_unknown_request_type_with_unsupported_and_goes_on() {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let agent = agent();
    std::thread::spawn(move || agent.serve(guest));
    // A request from a future ferry: type 0xee with a payload.
    let mut frame = b"FY".to_vec();
    frame.push(ferry_guest_agent::PROTOCOL_VERSION);
    frame.push(0xee);
    frame.extend_from_slice(&3u32.to_le_bytes());
    frame.extend_from_slice(b"abc");
    frame.extend(Message::Ping { nonce: 5 }.encode());
    host.write_all(&frame).unwrap();
    let mut dec = Decoder::new();
    let got = read_until(&mut host, &mut dec, PROMPT, |m| {
        matches!(m, Message::Pong { .. })
    });
    assert_eq!(
        got[1..],
        [
            Message::Unsupported { message_type: 0xee },
            Message::Pong { nonce: 5 }
        ]
    );
}

#[test]
fn failures_to_read_proc_are_reported_as_such() {
    let missing = std::env::temp_dir().join("ferry-no-such-proc");
    let mut conn = connect(agent().with_proc_dir(&missing));
    for e in [conn.load().unwrap_err(), conn.processes().unwrap_err()] {
        assert!(matches!(e, ClientError::RequestFailed { .. }), "{e:?}");
        assert!(e.to_string().contains("ferry-no-such-proc"), "{e}");
    }
    // The connection still works.
    assert!(conn.ping().is_ok());
}

/// A fake agent: sends Hello, then answers each frame it decodes with what `answer` returns.
/// Frames it cannot decode are dropped, as agents do.
fn fake_agent(
    answer: impl FnMut(Message) -> Vec<Message> + Send + 'static,
) -> AgentConnection<UnixStream> {
    fake_agent_with_timeout(answer, T)
}

fn fake_agent_with_timeout(
    mut answer: impl FnMut(Message) -> Vec<Message> + Send + 'static,
    timeout: Duration,
) -> AgentConnection<UnixStream> {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let hello = agent().hello().clone();
    std::thread::spawn(move || {
        guest.write_all(&Message::Hello(hello).encode()).unwrap();
        let mut dec = Decoder::new();
        let mut buf = [0; 4096];
        loop {
            let n = match guest.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            dec.push(&buf[..n]);
            loop {
                match dec.next() {
                    Ok(Some(m)) => {
                        for reply in answer(m) {
                            if guest.write_all(&reply.encode()).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
        }
    });
    AgentConnection::handshake(host, timeout).unwrap()
}

/// What agents built before ListProcesses and Load existed do: answer Hello requests and Pings,
/// drop frames of types they do not know (13 and up) without a word.
fn old_agent(m: Message) -> Vec<Message> {
    match m {
        Message::Ping { nonce } => vec![Message::Pong { nonce }],
        Message::HelloRequest => vec![Message::Hello(agent().hello().clone())],
        m if m.message_type() as u8 >= MessageType::ListProcesses as u8 => vec![],
        _ => vec![],
    }
}

#[test]
fn an_agent_older_than_the_requests_is_a_clear_error_not_a_timeout() {
    let mut conn = fake_agent(old_agent);
    let start = Instant::now();
    let e = conn.load().unwrap_err();
    assert!(start.elapsed() < PROMPT, "no waiting for a timeout");
    assert!(
        matches!(
            e,
            ClientError::AgentTooOld {
                request: MessageType::Load
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with(
            "the guest's agent is older than this ferry; rebuild the image: \
             `ferry image build --force`"
        ),
        "{text}"
    );
    let e = conn.processes().unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::AgentTooOld {
                request: MessageType::ListProcesses
            }
        ),
        "{e:?}"
    );
    // Nothing is left over to confuse what follows.
    assert!(conn.ping().is_ok());
    assert!(matches!(
        conn.load().unwrap_err(),
        ClientError::AgentTooOld { .. }
    ));
}

#[test]
fn an_unsupported_answer_is_the_same_clear_error() {
    let mut conn = fake_agent(|m| match m {
        Message::Ping { nonce } => vec![Message::Pong { nonce }],
        Message::Load => vec![Message::Unsupported {
            message_type: MessageType::Load as u8,
        }],
        _ => vec![],
    });
    let e = conn.load().unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::AgentTooOld {
                request: MessageType::Load
            }
        ),
        "{e:?}"
    );
    assert!(conn.ping().is_ok());
}

#[test]
fn a_late_answer_is_not_taken_for_the_next_requests() {
    let report = |uptime_ms| LoadInfo {
        uptime_ms,
        ..Default::default()
    };
    let mut loads = 0;
    let mut conn = fake_agent_with_timeout(
        move |m| match m {
            Message::Ping { nonce } => vec![Message::Pong { nonce }],
            Message::Load => {
                loads += 1;
                if loads == 1 {
                    // Slower than the client's timeout.
                    std::thread::sleep(Duration::from_millis(800));
                }
                vec![Message::LoadReport(report(loads))]
            }
            Message::ListProcesses => vec![Message::Processes(ProcessList::default())],
            _ => vec![],
        },
        Duration::from_millis(400),
    );
    let e = conn.load().unwrap_err();
    assert!(matches!(e, ClientError::Timeout(..)), "{e:?}");
    // The first answer arrives meanwhile and is skipped.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(conn.load().unwrap().uptime_ms, 2);
    assert_eq!(conn.load().unwrap().uptime_ms, 3);
    assert!(conn.processes().unwrap().is_empty());
    // Other calls consume the trailing Pongs without confusing the next request.
    assert!(conn.ping().is_ok());
    assert_eq!(conn.load().unwrap().uptime_ms, 4);
}
