//! Debian's stock kernel as a build input: the `linux-image-<abi>-amd64` package that
//! `linux-image-amd64` currently points at, unpacked into the cache, unmodified.

use std::path::{Path, PathBuf};

use crate::debian::{self, DebianError};

/// The metapackage that names the current stock kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// An unpacked Debian kernel package.
#[derive(Debug, Clone)]
pub struct KernelPackage {
    /// Package name, e.g. `linux-image-6.1.0-48-amd64`.
    pub package: String,
    /// Debian package version, e.g. `6.1.170-1`.
    pub version: String,
    /// Kernel release as `uname -r` prints it, e.g. `6.1.0-48-amd64`.
    pub release: String,
    /// The bzImage (`/boot/vmlinuz-<release>`).
    pub vmlinuz: PathBuf,
    /// The module tree (`/lib/modules/<release>`), with `modules.dep`.
    pub modules: PathBuf,
}

impl KernelPackage {
    /// Resolves, downloads (once) and unpacks the current stock kernel package.
    pub fn fetch(cache: &Path) -> Result<Self, DebianError> {
        let package = debian::dependency_with_prefix(KERNEL_METAPACKAGE, "linux-image-")?;
        let pkg = debian::fetch(&package, cache)?;
        let release = package.trim_start_matches("linux-image-").to_string();
        Ok(Self {
            vmlinuz: pkg.root.join("boot").join(format!("vmlinuz-{release}")),
            modules: pkg.root.join("lib/modules").join(&release),
            package,
            version: pkg.version,
            release,
        })
    }
}
