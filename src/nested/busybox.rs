//! Busybox in the outer machine's initramfs.
//!
//! Stand-in until `crate::image::add_busybox` lands: only the binary at `/bin/busybox`; the init
//! script installs the applet links itself (`busybox --install -s /bin`).

use std::path::Path;

use super::NestedError;
use crate::cpio::CpioWriter;

/// Adds Debian's `busybox-static` (unpacked at `busybox_root`) as `/bin/busybox`.
pub fn add(cpio: &mut CpioWriter, busybox_root: &Path) -> Result<(), NestedError> {
    let path = busybox_root.join("bin/busybox");
    let data = std::fs::read(&path).map_err(|source| NestedError::Io {
        what: format!("read {}", path.display()),
        source,
    })?;
    cpio.file("bin/busybox", 0o755, &data);
    Ok(())
}
