//! The file sink: appends batches to one file, rotated by size and by age. A rotated file
//! is renamed `<path>.<UTC time>` (with `.1`, `.2`… if that name is taken) and a new one
//! is started. A batch never straddles two files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use super::Writer;

pub struct FileWriter {
    path: PathBuf,
    rotate_bytes: Option<u64>,
    rotate_age: Option<Duration>,
    file: Option<File>,
    written: u64,
    opened: Instant,
}

impl FileWriter {
    pub fn new(path: PathBuf, rotate_bytes: Option<u64>, rotate_age: Option<Duration>) -> Self {
        FileWriter {
            path,
            rotate_bytes,
            rotate_age,
            file: None,
            written: 0,
            opened: Instant::now(),
        }
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = f.metadata()?.len();
        self.opened = Instant::now();
        Ok(self.file.insert(f))
    }

    fn rotation_due(&self, next: usize) -> bool {
        if self.written == 0 {
            return false;
        }
        let by_size = self
            .rotate_bytes
            .is_some_and(|max| self.written + next as u64 > max);
        let by_age = self
            .rotate_age
            .is_some_and(|age| self.opened.elapsed() >= age);
        by_size || by_age
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_data()?;
        }
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let stamp: String = String::from_utf8_lossy(&crate::batch::json::civil(secs))
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let base = format!("{}.{stamp}Z", self.path.display());
        let mut target = PathBuf::from(&base);
        let mut n = 1;
        while target.exists() {
            target = PathBuf::from(format!("{base}.{n}"));
            n += 1;
        }
        std::fs::rename(&self.path, &target)?;
        self.written = 0;
        Ok(())
    }
}

impl Writer for FileWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        // Whatever failed, say which file.
        self.write_inner(data)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }

    fn close(&mut self) -> std::io::Result<()> {
        match self.file.take() {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

impl FileWriter {
    fn write_inner(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            self.open()?;
        }
        if self.rotation_due(data.len()) {
            self.rotate()?;
            self.open()?;
        }
        let f = match &mut self.file {
            Some(f) => f,
            None => self.open()?,
        };
        if let Err(e) = f.write_all(data) {
            // A partial write may have landed: reopen, and the retry appends the batch
            // whole after it. Readers see a torn line only where the disk failed.
            self.file = None;
            return Err(e);
        }
        self.written += data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_without_splitting_batches() {
        let dir = std::env::temp_dir().join(format!("sluice-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("out.ndjson");
        let mut w = FileWriter::new(path.clone(), Some(10), None);
        w.write(b"aaaa\n").unwrap();
        w.write(b"bbbb\n").unwrap(); // 10 bytes: fits
        w.write(b"cccc\n").unwrap(); // would be 15: rotates first
        w.close().unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 2);
        assert_eq!(std::fs::read(&path).unwrap(), b"cccc\n");
        let rotated = files.iter().find(|p| **p != path).unwrap();
        assert_eq!(std::fs::read(rotated).unwrap(), b"aaaa\nbbbb\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotates_by_age() {
        let dir = std::env::temp_dir().join(format!("sluice-file-age-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("out.ndjson");
        let mut w = FileWriter::new(path.clone(), None, Some(Duration::from_millis(50)));
        w.write(b"old\n").unwrap();
        w.write(b"still young\n").unwrap();
        std::thread::sleep(Duration::from_millis(80));
        w.write(b"new\n").unwrap();
        w.close().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        let rotated: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| *p != path)
            .collect();
        assert_eq!(rotated.len(), 1);
        assert_eq!(std::fs::read(&rotated[0]).unwrap(), b"old\nstill young\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
