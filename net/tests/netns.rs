//! TAP devices and bridges created for real, each test inside a network namespace of its own
//! (made with unshare(2) on a thread of its own), so the host's network is never touched.

use std::process::Command;

use ferry_net::bridge::BridgeError;
use ferry_net::{Bridge, Ipv4Cidr, Tap};

/// Runs `f` on a thread inside a new, empty network namespace.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) only changes this thread's namespaces (a thread of its own, whose
        // children inherit them); no memory is involved.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) needs root: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("the namespace thread does not panic")
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_tap_plugged_into_a_bridge_that_carries_the_gateway_address() {
    in_netns(|| {
        let net: Ipv4Cidr = "10.77.0.2/24".parse().unwrap();
        let bridge = Bridge::ensure("ferrytest0", net).unwrap();
        let tap = Tap::create("ferrytap%d").unwrap();
        assert!(tap.name().starts_with("ferrytap"), "{}", tap.name());
        bridge.attach(tap.name()).unwrap();
        let addrs = ip_out(&["-o", "-4", "addr", "show", "dev", "ferrytest0"]);
        assert!(addrs.contains("10.77.0.1/24"), "{addrs}");
        let link = ip_out(&["-o", "link", "show", "dev", tap.name()]);
        assert!(link.contains("master ferrytest0"), "{link}");
        // Idempotent: a second ensure finds the bridge as it is.
        Bridge::ensure("ferrytest0", net).unwrap();
        // Closing the TAP's descriptor removes the device.
        let name = tap.name().to_string();
        drop(tap);
        assert!(ip_out(&["-o", "link", "show", "dev", &name]).is_empty());
        Bridge::remove("ferrytest0").unwrap();
        assert!(ip_out(&["-o", "link", "show", "dev", "ferrytest0"]).is_empty());
    });
}

#[test]
fn guests_starting_at_once_share_one_bridge() {
    in_netns(|| {
        let net: Ipv4Cidr = "10.77.5.2/24".parse().unwrap();
        // Threads inherit the namespace of the thread that spawns them.
        let racers: Vec<_> = (0..6)
            .map(|_| std::thread::spawn(move || Bridge::ensure("ferrytest2", net)))
            .collect();
        for r in racers {
            let bridge = r.join().unwrap();
            assert!(bridge.is_ok(), "{:?}", bridge.err());
        }
        let addrs = ip_out(&["-o", "-4", "addr", "show", "dev", "ferrytest2"]);
        assert_eq!(addrs.matches("10.77.5.1/24").count(), 1, "{addrs}");
    });
}

#[test]
fn a_network_that_clashes_with_an_existing_address_is_refused() {
    in_netns(|| {
        let status = Command::new("ip")
            .args([
                "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        Command::new("ip")
            .args(["addr", "add", "10.88.0.7/16", "dev", "veth0"])
            .status()
            .unwrap();
        let err = Bridge::ensure("ferrytest1", "10.88.3.2/24".parse().unwrap()).unwrap_err();
        assert!(matches!(err, BridgeError::Clash { .. }), "{err}");
        assert!(err.to_string().contains("veth0"), "{err}");
        assert!(ip_out(&["-o", "link", "show", "dev", "ferrytest1"]).is_empty());
    });
}

#[test]
fn overlong_names_are_refused() {
    assert!(Tap::create("a-name-longer-than-15").is_err());
    assert!(matches!(
        Bridge::ensure("a-name-longer-than-15", "10.99.0.2/24".parse().unwrap()),
        Err(BridgeError::Name(_))
    ));
}
