//! Choosing QEMU's accelerator: [`resolve`] turns [`Accel::Auto`] into KVM — only when the
//! host probe proves it usable ([`crate::host::kvm`]) — or TCG, logging why when it falls back;
//! `VMRS_ACCEL=kvm|tcg|auto` overrides `auto`.

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
            Some("auto") | Some("") | None => Accel::Auto,
            Some(other) => return Err(format!("VMRS_ACCEL={other:?} is not one of auto, kvm, tcg")),
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
        Accel::Auto => match kvm_usable() {
            Ok(_) => Ok(AccelChoice {
                accel: Accel::Kvm,
                fallback_reason: None,
            }),
            Err(reason) => {
                tracing::info!("kvm not usable ({reason}); falling back to tcg software emulation");
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
    fn auto_resolves_to_a_concrete_accel_with_reason_on_fallback() {
        let c = resolve(Accel::Auto).expect("auto");
        match c.accel {
            Accel::Kvm => assert!(kvm_usable().is_ok()),
            Accel::Tcg => {
                if std::env::var("VMRS_ACCEL").as_deref() != Ok("tcg") {
                    assert!(c.fallback_reason.is_some());
                }
            }
            Accel::Auto => panic!("auto must resolve"),
        }
    }
}
