//! Who holds a lent controller, and which loan a release may end.
//!
//! A pod is named by more than its namespace and name: when a Deployment rolls, a new pod can be
//! given the controller while the old one's release is still pending, and a pod recreated under
//! the same name is another pod. A loan therefore records the pod's UID and sandbox ID, and a
//! release ends only the loan of a holder it names.

use crate::kernel::netns::Netns;
use crate::pod::resources::PodRef;

/// Who holds a lent interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A pod's sandbox, given the interface itself.
    Pod {
        /// The pod.
        pod: PodRef,
        /// Its UID.
        uid: String,
        /// The runtime's ID of the sandbox the interface is in.
        sandbox: String,
    },
    /// A shared bus, as its uplink.
    Bus(String),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Pod { pod, sandbox, .. } => {
                let short = sandbox.get(..12).unwrap_or(sandbox);
                write!(f, "pod {pod} (sandbox {short})")
            }
            Holder::Bus(bus) => write!(f, "bus {bus}"),
        }
    }
}

/// Where a lent interface is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Loan {
    /// The borrower's namespace.
    pub ns: Netns,
    /// The interface's name there.
    pub name: String,
    /// The borrower.
    pub holder: Holder,
    /// Found already in place (a restarted plugin adopting it, a container restart) rather than
    /// moved there by this lend: undoing the lend then leaves the interface where it is.
    pub adopted: bool,
}

/// What ending the loans of `gone` holders does to the current loan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Release {
    /// Nothing was lent.
    Idle,
    /// The loan is one of `gone`'s: it ends.
    Ends(Loan),
    /// The loan is another holder's (a newer pod given the device meanwhile): it stays.
    Kept(Holder),
}

/// The fate of `loan` when `gone` holders are released.
pub(super) fn release(loan: Option<&Loan>, gone: &[Holder]) -> Release {
    match loan {
        None => Release::Idle,
        Some(l) if gone.contains(&l.holder) => Release::Ends(l.clone()),
        Some(l) => Release::Kept(l.holder.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn pod(name: &str, uid: &str, sandbox: &str) -> Holder {
        Holder::Pod {
            pod: PodRef {
                namespace: "default".into(),
                name: name.into(),
            },
            uid: uid.into(),
            sandbox: sandbox.into(),
        }
    }

    fn loan(holder: Holder) -> Loan {
        Loan {
            ns: Netns::Path(PathBuf::from("/var/run/netns/cni-b")),
            name: "can0".into(),
            holder,
            adopted: false,
        }
    }

    #[test]
    fn a_release_ends_only_the_loan_of_a_holder_it_names() {
        let a = pod("app-7d9f-a", "uid-a", "sandbox-a");
        let b = pod("app-7d9f-b", "uid-b", "sandbox-b");
        assert_eq!(release(None, std::slice::from_ref(&a)), Release::Idle);
        // The hand-over: A's release comes after B was given the controller.
        assert_eq!(
            release(Some(&loan(b.clone())), std::slice::from_ref(&a)),
            Release::Kept(b.clone())
        );
        assert_eq!(
            release(Some(&loan(a.clone())), &[b.clone(), a.clone()]),
            Release::Ends(loan(a))
        );
        // A nothing-gone pass ends nothing.
        assert_eq!(release(Some(&loan(b.clone())), &[]), Release::Kept(b));
    }

    #[test]
    fn the_same_pod_name_in_another_sandbox_or_uid_is_another_holder() {
        let old = pod("bench-user", "uid-1", "sandbox-1");
        // Recreated under the same name: a new UID and sandbox.
        let recreated = pod("bench-user", "uid-2", "sandbox-2");
        // Its sandbox recreated (same pod, new sandbox).
        let new_sandbox = pod("bench-user", "uid-1", "sandbox-3");
        for holder in [recreated, new_sandbox] {
            assert_eq!(
                release(Some(&loan(holder.clone())), std::slice::from_ref(&old)),
                Release::Kept(holder)
            );
        }
        // A bus's uplink is never a pod's to release.
        let bus = Holder::Bus("plant".into());
        assert_eq!(
            release(Some(&loan(bus.clone())), &[old]),
            Release::Kept(bus)
        );
    }

    #[test]
    fn a_holder_reads_as_pod_and_short_sandbox() {
        assert_eq!(
            pod("ecu", "u", "0123456789abcdef0123").to_string(),
            "pod default/ecu (sandbox 0123456789ab)"
        );
        assert_eq!(
            pod("ecu", "u", "s1").to_string(),
            "pod default/ecu (sandbox s1)"
        );
        assert_eq!(Holder::Bus("plant".into()).to_string(), "bus plant");
    }
}
