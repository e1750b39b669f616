//! A writer for the `newc` cpio format that Linux unpacks as an initramfs.
//!
//! The archive is left uncompressed: the guest kernel then copies it instead of inflating it,
//! which is faster under KVM than any decompressor.

use std::io::{self, Write};

/// Builds an initramfs archive in memory.
#[derive(Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl CpioWriter {
    pub fn new() -> Self {
        Self {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    /// A directory (parents must be added first).
    pub fn dir(&mut self, path: &str, mode: u32) {
        self.entry(path, S_IFDIR | (mode & 0o7777), 0, &[]);
    }

    /// A regular file with the given contents.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, S_IFREG | (mode & 0o7777), 0, data);
    }

    /// A symbolic link `path -> target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, 0, target.as_bytes());
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, S_IFCHR | (mode & 0o7777), 0, (major, minor));
    }

    fn entry(&mut self, path: &str, mode: u32, _nlink_hint: u32, data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(path, ino, mode, data.len() as u32, (0, 0));
        self.out.extend_from_slice(data);
        self.pad4();
    }

    fn header(&mut self, path: &str, ino: u32, mode: u32, size: u32, rdev: (u32, u32)) {
        let path = path.trim_start_matches('/');
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            path.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(path.as_bytes());
        self.out.push(0);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, 0, (0, 0));
        // The kernel accepts any padding; round up to 512 bytes like cpio(1) does.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }

    /// Ends the archive and writes it to `w`.
    pub fn write_to(self, mut w: impl Write) -> io::Result<()> {
        w.write_all(&self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_entries_in_order_and_is_padded() {
        let mut c = CpioWriter::new();
        c.dir("bin", 0o755);
        c.file("/bin/hello", 0o755, b"hi\n");
        c.symlink("init", "bin/hello");
        let bytes = c.finish();
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        let dir = text.find("bin\0").unwrap();
        let file = text.find("bin/hello\0").unwrap();
        let link = text.find("init\0").unwrap();
        let trailer = text.find("TRAILER!!!\0").unwrap();
        assert!(dir < file && file < link && link < trailer);
        // The regular file's size field (7th field) says 3 bytes.
        let hdr = &text[file - 110 + 6..file];
        assert_eq!(&hdr[6 * 8..7 * 8], "00000003");
    }

    #[test]
    fn every_header_starts_on_a_four_byte_boundary() {
        let mut c = CpioWriter::new();
        c.file("a", 0o644, b"12345");
        c.file("bb", 0o644, b"1");
        let bytes = c.finish();
        let text = String::from_utf8_lossy(&bytes);
        for (pos, _) in text.match_indices("070701") {
            assert_eq!(pos % 4, 0);
        }
        assert_eq!(text.matches("070701").count(), 3);
    }
}
