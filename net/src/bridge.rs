//! Linux bridges joining a host's guests to each other and to the host, configured with
//! iproute2's `ip` (Debian's iproute2 package), the tool an operator would use by hand.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::addr::Ipv4Cidr;

/// Errors configuring a bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("bridge `{0}` is longer than 15 bytes")]
    Name(String),
    #[error("{network}/{prefix} clashes with {addr} on `{dev}`: pick another network for the guests (or remove that address)")]
    Clash {
        network: Ipv4Addr,
        prefix: u8,
        addr: String,
        dev: String,
    },
}

fn ip(args: &[&str]) -> Result<String, BridgeError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(BridgeError::Spawn)?;
    if !out.status.success() {
        return Err(BridgeError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bridge with the host's address on a guest network.
#[derive(Debug, Clone)]
pub struct Bridge {
    name: String,
    network: Ipv4Cidr,
}

impl Bridge {
    /// Creates bridge `name` with the gateway address of `network` on it, or finds it as a
    /// previous call left it. Refuses a network that another interface already has an address in.
    pub fn ensure(name: &str, network: Ipv4Cidr) -> Result<Self, BridgeError> {
        if name.len() >= 16 {
            return Err(BridgeError::Name(name.to_string()));
        }
        let gateway = network.gateway();
        check_clash(name, &network)?;
        if ip(&["link", "show", "dev", name]).is_err() {
            // Another ferry starting a guest at the same moment may create it first.
            if let Err(e) = ip(&["link", "add", "name", name, "type", "bridge"]) {
                if ip(&["link", "show", "dev", name]).is_err() {
                    return Err(e);
                }
            }
        }
        ip(&["addr", "replace", &gateway.to_string(), "dev", name])?;
        ip(&["link", "set", "dev", name, "up"])?;
        Ok(Self {
            name: name.to_string(),
            network,
        })
    }

    /// The bridge's interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the bridge.
    pub fn gateway(&self) -> Ipv4Cidr {
        self.network.gateway()
    }

    /// Plugs the interface `dev` (a guest's TAP) into the bridge and brings it up.
    pub fn attach(&self, dev: &str) -> Result<(), BridgeError> {
        ip(&["link", "set", "dev", dev, "master", &self.name, "up"]).map(|_| ())
    }

    /// Deletes bridge `name` if it exists.
    pub fn remove(name: &str) -> Result<(), BridgeError> {
        if ip(&["link", "show", "dev", name]).is_ok() {
            ip(&["link", "del", "dev", name])?;
        }
        Ok(())
    }
}

/// Fails if an interface other than `bridge` has an address inside `network`.
fn check_clash(bridge: &str, network: &Ipv4Cidr) -> Result<(), BridgeError> {
    // Lines like "2: eth0    inet 10.0.2.15/24 brd ... scope global eth0".
    for line in ip(&["-o", "-4", "addr", "show"])?.lines() {
        let mut words = line.split_whitespace();
        let dev = words.nth(1).unwrap_or("");
        let Some(addr) = words.skip_while(|w| *w != "inet").nth(1) else {
            continue;
        };
        let Ok(theirs) = addr.parse::<Ipv4Cidr>() else {
            continue;
        };
        let overlap = network.contains(theirs.network()) || theirs.contains(network.network());
        if dev != bridge && overlap {
            return Err(BridgeError::Clash {
                network: network.network(),
                prefix: network.prefix,
                addr: addr.to_string(),
                dev: dev.to_string(),
            });
        }
    }
    Ok(())
}
