//! placeholder
use super::plan::VzLimits;

/// The framework's bounds.
pub fn limits() -> VzLimits {
    VzLimits::FALLBACK
}
