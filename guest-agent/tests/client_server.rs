//! The host client against the real agent server, over a UnixStream pair and loopback TCP.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_guest_agent::protocol::{Decoder, Message};
use ferry_guest_agent::{Agent, AgentConnection, ClientError, ExecRequest, PROTOCOL_VERSION};

const T: Duration = Duration::from_secs(10);

fn test_agent() -> (Agent, Arc<AtomicUsize>) {
    let power_offs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&power_offs);
    let agent = Agent::new(None).with_power_off(Arc::new(move || {
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    (agent, power_offs)
}

/// An agent serving one end of a socket pair on a thread; the client's end.
fn unix_pair() -> (UnixStream, Arc<AtomicUsize>) {
    let (host, guest) = UnixStream::pair().unwrap();
    let (agent, power_offs) = test_agent();
    std::thread::spawn(move || agent.serve(guest));
    (host, power_offs)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

fn run<S: ferry_guest_agent::Stream>(
    conn: &mut AgentConnection<S>,
    req: &ExecRequest,
    stdin: Option<Box<dyn Read + Send>>,
) -> (i32, Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = conn.exec(req, stdin, &mut out, &mut err).unwrap();
    (code, out, err)
}

#[test]
fn handshake_reports_the_agent() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let hello = conn.hello().clone();
    assert_eq!(hello.version, u16::from(PROTOCOL_VERSION));
    assert_eq!(hello.agent_version, env!("CARGO_PKG_VERSION"));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(hello.kernel_release, release.trim());
    assert!(hello.online_cpus >= 1);
    assert!(conn.ping().unwrap() < T);
    assert!(conn.ping().is_ok());
}

#[test]
fn exec_streams_stdout_and_stderr_and_returns_the_status() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let (code, out, err) = run(&mut conn, &sh("echo out; echo err >&2; exit 3"), None);
    assert_eq!(
        (code, &out[..], &err[..]),
        (3, &b"out\n"[..], &b"err\n"[..])
    );
    // The connection serves the next command.
    let (code, out, _) = run(&mut conn, &sh("printf again"), None);
    assert_eq!((code, &out[..]), (0, &b"again"[..]));
}

#[test]
fn env_cwd_and_default_path_are_applied() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let req = ExecRequest {
        env: vec![("GREETING".into(), "hi there".into())],
        cwd: Some("/tmp".into()),
        ..sh("echo \"$GREETING\"; pwd; echo \"$PATH\"; echo \"${HOME:-unset}\"")
    };
    let (code, out, _) = run(&mut conn, &req, None);
    assert_eq!(code, 0);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "hi there\n/tmp\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nunset\n"
    );
}

#[test]
fn missing_command_is_127_with_a_message() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let req = ExecRequest {
        argv: vec!["ferry-no-such-command".into()],
        ..Default::default()
    };
    let (code, out, err) = run(&mut conn, &req, None);
    assert_eq!(code, 127);
    assert!(out.is_empty());
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "ferry-agent: ferry-no-such-command: command not found\n"
    );
}

#[test]
fn non_executable_file_is_126() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let dir = std::env::temp_dir().join(format!("ferry-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("not-executable");
    std::fs::write(&file, "#!/bin/sh\necho no\n").unwrap();
    let req = ExecRequest {
        argv: vec![file.to_str().unwrap().into()],
        ..Default::default()
    };
    let (code, _, err) = run(&mut conn, &req, None);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 126);
    assert!(String::from_utf8(err)
        .unwrap()
        .ends_with("Permission denied\n"));
}

#[test]
fn signal_death_is_128_plus_the_signal() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let (code, _, _) = run(&mut conn, &sh("kill -9 $$"), None);
    assert_eq!(code, 128 + 9);
}

#[test]
fn stdin_is_forwarded_to_cat_and_closed() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    // Larger than one stream chunk and than a pipe buffer, to exercise back-pressure.
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let req = ExecRequest {
        argv: vec!["cat".into()],
        ..Default::default()
    };
    let (code, out, _) = run(
        &mut conn,
        &req,
        Some(Box::new(std::io::Cursor::new(input.clone()))),
    );
    assert_eq!(code, 0);
    assert_eq!(out, input);
    // Without stdin the command reads /dev/null.
    let (code, out, _) = run(&mut conn, &sh("wc -c"), None);
    assert_eq!((code, String::from_utf8(out).unwrap().trim()), (0, "0"));
}

#[test]
fn stdin_that_never_ends_does_not_block_a_command_that_ignores_it() {
    let (host, _) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let (code, out, _) = run(
        &mut conn,
        &sh("echo done"),
        Some(Box::new(std::io::repeat(b'x'))),
    );
    assert_eq!((code, &out[..]), (0, &b"done\n"[..]));
    let (code, _, _) = run(&mut conn, &sh("exit 5"), None);
    assert_eq!(code, 5);
}

#[test]
fn connection_dropping_mid_exec_is_an_error() {
    let (host, guest) = UnixStream::pair().unwrap();
    // A fake agent: Hello, then it takes the Exec and hangs up.
    std::thread::spawn(move || {
        let mut guest = guest;
        let (agent, _) = test_agent();
        guest
            .write_all(&Message::Hello(agent.hello().clone()).encode())
            .unwrap();
        let mut dec = Decoder::new();
        let mut buf = [0; 4096];
        loop {
            let n = guest.read(&mut buf).unwrap();
            dec.push(&buf[..n]);
            while let Some(m) = dec.next().unwrap() {
                if let Message::Exec(_) = m {
                    guest
                        .write_all(&Message::Stdout(b"partial".to_vec()).encode())
                        .unwrap();
                    return;
                }
            }
        }
    });
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let e = conn
        .exec(&sh("sleep 100"), None, &mut out, &mut err)
        .unwrap_err();
    assert!(matches!(e, ClientError::Disconnected(_)), "{e:?}");
    assert!(e.to_string().contains("closed while a command was running"));
    assert_eq!(out, b"partial");
}

#[test]
fn handshake_skips_garbage_and_times_out_on_silence() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let (agent, _) = test_agent();
    let mut stream = b"boot noise FY\x01\xff\x00\x00\x00\x00 more".to_vec();
    stream.extend_from_slice(&Message::Hello(agent.hello().clone()).encode());
    guest.write_all(&stream).unwrap();
    let conn = AgentConnection::handshake(host, T).unwrap();
    assert_eq!(conn.hello(), agent.hello());

    let (host, _guest) = UnixStream::pair().unwrap();
    let e = AgentConnection::handshake(host, Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::Timeout(..)), "{e:?}");
}

#[test]
fn handshake_names_a_newer_protocol_version() {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let mut frame = Message::Hello(test_agent().0.hello().clone()).encode();
    frame[2] = PROTOCOL_VERSION + 1;
    guest.write_all(&frame).unwrap();
    let e = AgentConnection::handshake(host, Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(e.to_string().contains("bad frame"), "{e}");
    let source = std::error::Error::source(&e).unwrap().to_string();
    assert!(source.contains("version 2"), "{source}");
}

#[test]
fn an_agent_that_started_earlier_answers_a_hello_request() {
    let (host, guest) = UnixStream::pair().unwrap();
    let (agent, _) = test_agent();
    std::thread::spawn(move || agent.serve(guest));
    // Consume the unsolicited Hello, as if the host had not been listening yet.
    let mut raw = host.try_clone().unwrap();
    let mut dec = Decoder::new();
    let mut buf = [0; 4096];
    while dec.next().unwrap().is_none() {
        let n = raw.read(&mut buf).unwrap();
        dec.push(&buf[..n]);
    }
    assert_eq!(dec.buffered(), 0);
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    assert!(conn.ping().is_ok());
}

#[test]
fn power_off_reaches_the_agent() {
    let (host, power_offs) = unix_pair();
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    conn.power_off().unwrap();
    conn.ping().unwrap(); // Frames are handled in order, so the power-off has run.
    assert_eq!(power_offs.load(Ordering::SeqCst), 1);
}

#[test]
fn tcp_connections_are_served_concurrently() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (agent, _) = test_agent();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let agent = agent.clone();
            std::thread::spawn(move || agent.serve(s.unwrap()));
        }
    });
    let mut slow = AgentConnection::handshake(TcpStream::connect(addr).unwrap(), T).unwrap();
    let mut fast = AgentConnection::handshake(TcpStream::connect(addr).unwrap(), T).unwrap();
    let waiter = std::thread::spawn(move || run(&mut slow, &sh("sleep 2; echo slow"), None));
    let (code, out, _) = run(&mut fast, &sh("echo fast"), None);
    assert_eq!((code, &out[..]), (0, &b"fast\n"[..]));
    assert!(!waiter.is_finished());
    let (code, out, _) = waiter.join().unwrap();
    assert_eq!((code, &out[..]), (0, &b"slow\n"[..]));
}

#[test]
fn a_second_exec_while_one_runs_is_refused() {
    let (mut host, guest) = UnixStream::pair().unwrap();
    let (agent, _) = test_agent();
    std::thread::spawn(move || agent.serve(guest));
    let mut frames = Message::Exec(sh("sleep 1")).encode();
    frames.extend(Message::Exec(sh("echo no")).encode());
    host.write_all(&frames).unwrap();
    let mut dec = Decoder::new();
    let mut buf = [0; 4096];
    let mut got = Vec::new();
    while !got.iter().any(|m| matches!(m, Message::Exited { .. })) {
        let n = host.read(&mut buf).unwrap();
        assert_ne!(n, 0);
        dec.push(&buf[..n]);
        while let Some(m) = dec.next().unwrap() {
            got.push(m);
        }
    }
    assert!(matches!(got[0], Message::Hello(_)));
    assert!(
        matches!(&got[1], Message::Failed { code: 125, message } if message.contains("still running"))
    );
    assert_eq!(got[2], Message::Exited { code: 0 });
}

#[test]
fn chrooted_agent_runs_commands_inside_the_root() {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !is_root {
        eprintln!("skipped: chroot(2) needs root");
        return;
    }
    // The root "/" keeps the host's shell reachable while going through chroot(2) and chdir(2).
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = Agent::new(Some("/".into()));
    std::thread::spawn(move || agent.serve(guest));
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let req = ExecRequest {
        cwd: Some("/tmp".into()),
        ..sh("pwd")
    };
    let (code, out, _) = run(&mut conn, &req, None);
    assert_eq!((code, &out[..]), (0, &b"/tmp\n"[..]));
    let req = ExecRequest {
        cwd: Some("/no/such/dir".into()),
        ..sh("pwd")
    };
    let (code, _, err) = run(&mut conn, &req, None);
    assert_eq!(code, 125);
    assert!(String::from_utf8(err).unwrap().contains("/no/such/dir"));
}

/// The session id and parent pid of `pid`, from /proc/PID/stat.
fn session_and_parent(pid: u32) -> (u32, u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[3].parse().unwrap(), f[1].parse().unwrap())
}

#[test]
fn start_runs_a_program_detached_with_its_output_in_a_log() {
    let dir = std::env::temp_dir().join(format!("ferry-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = Agent::new(None).with_log_dir(dir.to_string_lossy().into_owned());
    std::thread::spawn(move || agent.serve(guest));
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let (pid, log) = conn
        .start(&sh(
            "echo out; echo err >&2; read x; echo read=$x; sleep 30",
        ))
        .unwrap();
    assert_eq!(log, format!("{}/{pid}.log", dir.display()));
    // Its own session (it leads it), a child of the agent (this test process here), stdin
    // at end of file.
    let (session, parent) = session_and_parent(pid);
    assert_eq!(session, pid);
    assert_eq!(parent, std::process::id());
    let deadline = std::time::Instant::now() + T;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("read=") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(text, "out\nerr\nread=\n");
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
    // The connection closing does not end it (unlike an Exec).
    drop(conn);
    std::thread::sleep(Duration::from_millis(300));
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    kill_hard(pid);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ends a test's process with `kill -9` (no unsafe code in tests).
fn kill_hard(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

#[test]
fn start_of_a_missing_program_is_127_and_leaves_no_log() {
    let dir = std::env::temp_dir().join(format!("ferry-start-missing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = Agent::new(None).with_log_dir(dir.to_string_lossy().into_owned());
    std::thread::spawn(move || agent.serve(guest));
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let req = ExecRequest {
        argv: vec!["ferry-no-such-command".into()],
        ..Default::default()
    };
    match conn.start(&req) {
        Err(ClientError::StartFailed { code, message }) => {
            assert_eq!(code, 127);
            assert_eq!(
                message,
                "ferry-agent: ferry-no-such-command: command not found"
            );
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert!(matches!(
        conn.start(&ExecRequest::default()),
        Err(ClientError::EmptyCommand)
    ));
    // The connection goes on.
    assert!(conn.ping().is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_started_process_passes_the_migration_checks() {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !is_root {
        eprintln!("skipped: reading page frames needs root");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-start-movable-{}", std::process::id()));
    let (host, guest) = UnixStream::pair().unwrap();
    let agent = Agent::new(None).with_log_dir(dir.to_string_lossy().into_owned());
    std::thread::spawn(move || agent.serve(guest));
    let mut conn = AgentConnection::handshake(host, T).unwrap();
    let (pid, _) = conn
        .start(&ExecRequest {
            argv: vec!["sleep".into(), "30".into()],
            ..Default::default()
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Nothing inherited from the agent's process (here: the test harness's pipes) beyond
    // stdin, stdout and stderr.
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    fds.sort();
    assert_eq!(fds, ["0", "1", "2"]);
    // Its files (stdin /dev/null, the log) and mappings are all of kinds that move.
    let pages = conn.survey(pid).unwrap();
    assert!(!pages.is_empty());
    kill_hard(pid);
    let _ = std::fs::remove_dir_all(&dir);
}
