//! Choosing QEMU's accelerator: [`resolve`] turns [`Accel::Auto`] into KVM — only when the
//! host probe proves it usable ([`crate::host::kvm`]) —, on macOS into HVF when
//! Hypervisor.framework can run the guest ([`crate::host::hvf_usable`]), or else TCG, logging
//! why when it falls back; `VMRS_ACCEL=kvm|hvf|tcg|auto` overrides `auto`.

use crate::config::Accel;
use crate::host::kvm::usable as kvm_usable;

/// Result of resolving the accelerator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// `kvm` or `tcg`.
    pub accel: Accel,
    /// Why TCG was chosen, when auto fell back.
    pub fallback_reason: Option<String>,
}

/// Decide the accelerator for a VM. `requested` is the config's value; `Auto` consults
/// `VMRS_ACCEL`, then the probe.
pub fn resolve(requested: Accel) -> Result<AccelChoice, String> {
    let requested = match requested {
        Accel::Auto => match std::env::var("VMRS_ACCEL").ok().as_deref() {
            Some("kvm") => Accel::Kvm,
            Some("tcg") => Accel::Tcg,
            Some("hvf") => Accel::Hvf,
            Some("auto") | Some("") | None => Accel::Auto,
            Some(other) => return Err(format!("VMRS_ACCEL={other:?} is not one of auto, kvm, hvf, tcg")),
        },
        other => other,
    };
    match requested {
        Accel::Tcg => Ok(AccelChoice {
            accel: Accel::Tcg,
            fallback_reason: None,
        }),
        Accel::Kvm => match kvm_usable() {
            Ok(_) => Ok(AccelChoice {
                accel: Accel::Kvm,
                fallback_reason: None,
            }),
            Err(reason) => Err(reason),
        },
        Accel::Hvf => match crate::host::hvf_usable() {
            Some(Ok(())) => Ok(AccelChoice {
                accel: Accel::Hvf,
                fallback_reason: None,
            }),
            Some(Err(reason)) => Err(reason),
            None => Err("Hypervisor.framework (hvf) exists only on macOS".into()),
        },
        Accel::Auto => match kvm_usable() {
            Ok(_) => Ok(AccelChoice {
                accel: Accel::Kvm,
                fallback_reason: None,
            }),
            Err(kvm_reason) => {
                let reason = match crate::host::hvf_usable() {
                    Some(Ok(())) => {
                        return Ok(AccelChoice {
                            accel: Accel::Hvf,
                            fallback_reason: None,
                        })
                    }
                    Some(Err(hvf_reason)) => hvf_reason,
                    None => kvm_reason,
                };
                tracing::info!("no hardware acceleration ({reason}); falling back to tcg software emulation");
                Ok(AccelChoice {
                    accel: Accel::Tcg,
                    fallback_reason: Some(reason),
                })
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_tcg_needs_no_probe() {
        let c = resolve(Accel::Tcg).expect("tcg");
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.fallback_reason.is_none());
    }

    #[test]
    fn hvf_is_refused_with_a_reason_where_the_host_has_none() {
        match crate::host::hvf_usable() {
            None => {
                let e = resolve(Accel::Hvf).expect_err("hvf off macOS");
                assert!(e.contains("only on macOS"), "{e}");
            }
            Some(Ok(())) => assert_eq!(resolve(Accel::Hvf).map(|c| c.accel), Ok(Accel::Hvf)),
            Some(Err(why)) => assert_eq!(resolve(Accel::Hvf).map(|c| c.accel), Err(why)),
        }
    }

    #[test]
    fn auto_resolves_to_a_concrete_accel_with_reason_on_fallback() {
        let c = resolve(Accel::Auto).expect("auto");
        match c.accel {
            Accel::Kvm => assert!(kvm_usable().is_ok()),
            Accel::Tcg => {
                if std::env::var("VMRS_ACCEL").as_deref() != Ok("tcg") {
                    assert!(c.fallback_reason.is_some());
                }
            }
            Accel::Hvf => assert!(matches!(crate::host::hvf_usable(), Some(Ok(())))),
            Accel::Auto => panic!("auto must resolve"),
        }
    }
}
