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

/// Errors from extracting the ELF kernel out of a bzImage.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a bzImage with a payload (boot protocol 2.08 or newer)")]
    NotBzImage(PathBuf),
    #[error("{path}: its payload is compressed with {format}; ferry extracts only XZ payloads (Debian's)")]
    Compression { path: PathBuf, format: &'static str },
    #[error("decompressing {path} with xz: {detail}")]
    Xz { path: PathBuf, detail: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The compressed payload of a bzImage: where it is and how it is compressed.
fn payload(image: &[u8]) -> Option<(&[u8], &'static str)> {
    if image.len() < 0x250 || &image[0x202..0x206] != b"HdrS" {
        return None;
    }
    if u16::from_le_bytes([image[0x206], image[0x207]]) < 0x0208 {
        return None;
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512;
    let off = u32::from_le_bytes(image[0x248..0x24c].try_into().ok()?) as usize;
    let len = u32::from_le_bytes(image[0x24c..0x250].try_into().ok()?) as usize;
    let data = image.get(start + off..start + off + len)?;
    let format = match data {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x1f, 0x8b, ..] => "gzip",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        _ => "an unknown method",
    };
    Some((data, format))
}

/// Decompresses the ELF kernel (`vmlinux`) out of a bzImage into `out`, once: the guest then
/// skips decompressing itself at every boot. The code is byte for byte the distribution's.
/// Needs Debian's `xz` tool (xz-utils, which every Debian system has).
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), ExtractError> {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let image = std::fs::read(bzimage).map_err(|source| ExtractError::Read {
        path: bzimage.to_path_buf(),
        source,
    })?;
    let (data, format) =
        payload(&image).ok_or_else(|| ExtractError::NotBzImage(bzimage.to_path_buf()))?;
    if format != "xz" {
        return Err(ExtractError::Compression {
            path: bzimage.to_path_buf(),
            format,
        });
    }
    let xz_err = |detail: String| ExtractError::Xz {
        path: bzimage.to_path_buf(),
        detail,
    };
    let tmp = out.with_extension("partial");
    let file = std::fs::File::create(&tmp).map_err(|source| ExtractError::Write {
        path: tmp.clone(),
        source,
    })?;
    // The kernel appends its uncompressed size after the XZ stream: decode one stream only.
    let mut child = Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| xz_err(format!("cannot start xz: {e} (install xz-utils)")))?;
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let result = child
        .wait_with_output()
        .map_err(|e| xz_err(e.to_string()))?;
    let fed = feeder.join().expect("the feeder thread does not panic");
    if !result.status.success() || fed.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return Err(xz_err(
            String::from_utf8_lossy(&result.stderr).trim().to_string(),
        ));
    }
    let head = std::fs::read(&tmp)
        .ok()
        .filter(|b| b.starts_with(b"\x7fELF"));
    if head.is_none() {
        let _ = std::fs::remove_file(&tmp);
        return Err(xz_err("the payload is not an ELF kernel".into()));
    }
    std::fs::rename(&tmp, out).map_err(|source| ExtractError::Write {
        path: out.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(payload_bytes: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x1f1] = 1; // setup_sects: the payload area starts at 1024
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload_bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        b.extend_from_slice(payload_bytes);
        b
    }

    #[test]
    fn payload_is_found_and_its_compression_named() {
        let img = fake_bzimage(&[0x1f, 0x8b, 8, 0]);
        let (data, format) = payload(&img).unwrap();
        assert_eq!(data, &[0x1f, 0x8b, 8, 0]);
        assert_eq!(format, "gzip");
        assert!(payload(b"not a kernel").is_none());
    }

    #[test]
    fn an_xz_payload_decompresses_to_the_elf_inside() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let elf = [b"\x7fELF".as_slice(), &[2u8; 60]].concat();
        let mut xz = Command::new("xz")
            .args(["--compress", "--stdout", "--check=crc32"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz (xz-utils) is on every Debian system");
        xz.stdin.take().unwrap().write_all(&elf).unwrap();
        let mut compressed = xz.wait_with_output().unwrap().stdout;
        compressed.extend_from_slice(&(elf.len() as u32).to_le_bytes()); // as the kernel does
        let dir = std::env::temp_dir().join(format!("ferry-kernel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bz = dir.join("vmlinuz");
        std::fs::write(&bz, fake_bzimage(&compressed)).unwrap();
        let out = dir.join("vmlinux");
        extract_vmlinux(&bz, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), elf);

        std::fs::write(&bz, fake_bzimage(&[0x1f, 0x8b, 8, 0])).unwrap();
        assert!(matches!(
            extract_vmlinux(&bz, &out),
            Err(ExtractError::Compression { format: "gzip", .. })
        ));
    }
}
