//! The interface and its addresses: a small trait over rtnetlink so the decisions (which link
//! kind, which addresses to add) are tested without root.

use std::net::IpAddr;
use std::sync::Once;

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkDummy};

use crate::SetupError;
use crate::desired::{Address, DesiredState};

/// A link as seen in the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: String,
}

/// Links and addresses of the namespace, from one dump each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetState {
    pub links: Vec<Link>,
    /// (link index, address) of every address in the namespace.
    pub addresses: Vec<(u32, IpAddr)>,
}

impl NetState {
    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    /// An address already on any interface (an operator's, an older install's) is not added
    /// again.
    pub fn has_address(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|(_, a)| *a == ip)
    }
}

/// Why a link could not be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddLinkError {
    /// The kernel does not know this link type (EOPNOTSUPP / "Unknown device type").
    Unsupported,
    /// Created concurrently by someone else.
    Exists,
    Other(String),
}

/// Link kinds tried in order. `dummy` is the real-node kind; this kernel (and CI) lack it, and a
/// port-less bridge delivers locally just as well, link up or down (docs/design-facts.md §1).
pub const LINK_KINDS: [&str; 2] = ["dummy", "bridge"];

pub trait Links {
    /// The link called `name` (if any) and every address of the namespace. Only one link is
    /// fetched: a node with hundreds of pod veths would make a full link dump the slow part.
    fn dump(&self, name: &str) -> Result<NetState, SetupError>;
    fn add_link(&self, name: &str, kind: &str) -> Result<(), AddLinkError>;
    /// Adds `addr` with IFA_F_NODAD; "already exists" is success.
    fn add_address(&self, index: u32, addr: Address) -> Result<(), SetupError>;
    fn delete_link(&self, index: u32) -> Result<(), SetupError>;
}

static FALLBACK_LOGGED: Once = Once::new();

/// Creates the interface with the first kind the kernel supports; returns the kind used.
/// A link created concurrently by another process counts as success (the caller re-dumps).
pub fn create_link(links: &dyn Links, name: &str) -> Result<Option<String>, SetupError> {
    for kind in LINK_KINDS {
        match links.add_link(name, kind) {
            Ok(()) => {
                if kind != LINK_KINDS[0] {
                    FALLBACK_LOGGED.call_once(|| {
                        tracing::warn!(
                            interface = name,
                            kind,
                            "kernel has no dummy link type; using a port-less {kind} instead"
                        );
                    });
                }
                return Ok(Some(kind.to_string()));
            }
            Err(AddLinkError::Exists) => return Ok(None),
            Err(AddLinkError::Unsupported) => continue,
            Err(AddLinkError::Other(msg)) => {
                return Err(SetupError::AddInterface {
                    name: name.to_string(),
                    msg: format!("add {kind}: {msg}"),
                });
            }
        }
    }
    Err(SetupError::AddInterface {
        name: name.to_string(),
        msg: format!("kernel supports none of {LINK_KINDS:?}"),
    })
}

/// Desired addresses not present on any interface.
pub fn absent_addresses(desired: &DesiredState, state: &NetState) -> Vec<Address> {
    desired
        .addresses
        .iter()
        .filter(|a| !state.has_address(a.ip))
        .copied()
        .collect()
}

/// rtnetlink on a private current-thread runtime: works from a plain thread and from inside a
/// tokio `spawn_blocking` thread alike, and the socket is opened in the calling thread, so it
/// acts in that thread's network namespace.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    pub fn open() -> Result<Netlink, SetupError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(netlink_failed("runtime"))?;
        let (conn, handle, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(netlink_failed("socket"))?
        };
        rt.spawn(conn);
        Ok(Netlink { rt, handle })
    }
}

fn netlink_failed<E: std::fmt::Display>(
    request: impl Into<String>,
) -> impl FnOnce(E) -> SetupError {
    move |e| SetupError::NetlinkRequest {
        request: request.into(),
        msg: e.to_string(),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn link_from_message(msg: &LinkMessage) -> Link {
    let mut name = String::new();
    let mut kind = String::new();
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = n.clone(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        kind = k.to_string();
                    }
                }
            }
            _ => {}
        }
    }
    Link {
        index: msg.header.index,
        name,
        kind,
    }
}

fn address_from_message(msg: &AddressMessage) -> Option<(u32, IpAddr)> {
    // IFA_LOCAL is the local address on point-to-point links; IFA_ADDRESS otherwise.
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    local.or(address).map(|ip| (msg.header.index, ip))
}

impl Links for Netlink {
    fn dump(&self, name: &str) -> Result<NetState, SetupError> {
        let handle = self.handle.clone();
        let name = name.to_string();
        self.rt.block_on(async move {
            let links: Vec<LinkMessage> = match handle
                .link()
                .get()
                .match_name(name.clone())
                .execute()
                .try_collect()
                .await
            {
                Ok(links) => links,
                Err(e) if errno(&e) == Some(libc::ENODEV) => Vec::new(),
                Err(e) => return Err(netlink_failed(format!("get link {name}"))(e)),
            };
            let addrs: Vec<AddressMessage> = handle
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(netlink_failed("address dump"))?;
            Ok(NetState {
                links: links.iter().map(link_from_message).collect(),
                addresses: addrs.iter().filter_map(address_from_message).collect(),
            })
        })
    }

    fn add_link(&self, name: &str, kind: &str) -> Result<(), AddLinkError> {
        let msg = match kind {
            "dummy" => LinkDummy::new(name).up().build(),
            "bridge" => LinkBridge::new(name).up().build(),
            other => {
                debug_assert!(false, "unknown link kind {other}");
                return Err(AddLinkError::Unsupported);
            }
        };
        let handle = self.handle.clone();
        let res = self
            .rt
            .block_on(async move { handle.link().add(msg).execute().await });
        match res {
            Ok(()) => Ok(()),
            Err(e) => match errno(&e) {
                Some(libc::EEXIST) => Err(AddLinkError::Exists),
                Some(libc::EOPNOTSUPP) => Err(AddLinkError::Unsupported),
                _ => Err(AddLinkError::Other(e.to_string())),
            },
        }
    }

    fn add_address(&self, index: u32, addr: Address) -> Result<(), SetupError> {
        let handle = self.handle.clone();
        let res = self.rt.block_on(async move {
            let mut req = handle.address().add(index, addr.ip, addr.prefix);
            // Without NODAD an IPv6 address stays tentative (forever without carrier) and
            // bind() fails (docs/design-facts.md §1).
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            req.execute().await
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(SetupError::AddAddress {
                addr: addr.ip,
                msg: e.to_string(),
            }),
        }
    }

    fn delete_link(&self, index: u32) -> Result<(), SetupError> {
        let handle = self.handle.clone();
        let res = self
            .rt
            .block_on(async move { handle.link().del(index).execute().await });
        match res {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(netlink_failed(format!("delete link {index}"))(e)),
        }
    }
}
