//! Start-up probes: can this process run glommio's io_uring cores? glommio needs at least
//! 512 KiB of locked memory and the io_uring system calls, which Docker's and containerd's
//! default seccomp profiles and ECS Fargate block. `io = "auto"` then runs the epoll
//! backend and says why; `io = "uring"` fails with what to change.

use std::io;

use rlimit::Resource;

/// glommio refuses to start its reactor with less locked memory than this.
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Registered I/O memory per core. We do no file I/O through glommio, so its minimum.
pub const IO_MEMORY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {soft} bytes, and the io_uring engine needs at least {MIN_MEMLOCK}. \
         Raise it: `ulimit -l 1024` in the shell that starts sluice, LimitMEMLOCK=infinity in a systemd unit, \
         `--ulimit memlock=-1` for docker run, or a memlock ulimit in the ECS task definition"
    )]
    Memlock { soft: u64 },
    #[error(
        "io_uring is disabled on this host (kernel.io_uring_disabled = 2). \
         Enable it with `sysctl -w kernel.io_uring_disabled=0`"
    )]
    Disabled,
    #[error(
        "io_uring_setup was refused ({0}). A seccomp profile blocks io_uring here: Docker's and containerd's \
         default profiles and ECS Fargate do, as does kernel.io_uring_disabled = 1 for unprivileged users. \
         Allow io_uring_setup, io_uring_enter and io_uring_register in the container's seccomp profile \
         (for example `docker run --security-opt seccomp=unconfined`), or run where io_uring is allowed"
    )]
    Blocked(io::Error),
    #[error("this kernel has no io_uring ({0}); the io_uring engine needs Linux 5.8 or newer")]
    NoUring(io::Error),
    #[error("the io_uring engine could not start: {0}")]
    Other(String),
}

impl ProbeError {
    /// Why io_uring is out, in a few words, for the line that names the backend chosen.
    pub fn reason(&self) -> String {
        match self {
            ProbeError::Memlock { soft } => {
                format!("locked-memory limit {soft} bytes is below io_uring's {MIN_MEMLOCK}")
            }
            ProbeError::Disabled => "io_uring disabled by kernel.io_uring_disabled".into(),
            ProbeError::Blocked(e) if restricted() => format!(
                "io_uring refused ({}) under kernel.io_uring_disabled = 1",
                errno_name(e)
            ),
            ProbeError::Blocked(e) => format!("io_uring refused by seccomp ({})", errno_name(e)),
            ProbeError::NoUring(_) => "this kernel has no io_uring (ENOSYS)".into(),
            ProbeError::Other(e) => format!("io_uring failed to start: {e}"),
        }
    }
}

fn restricted() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|s| s.trim() == "1")
}

fn errno_name(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(nix::libc::EPERM) => "EPERM",
        Some(nix::libc::EACCES) => "EACCES",
        _ => "refused",
    }
}

/// Checks locked memory (raising the soft limit to the hard one where that is enough)
/// and that an io_uring executor can be created.
pub fn check_uring() -> Result<(), ProbeError> {
    check_memlock()?;
    if std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|s| s.trim() == "2")
    {
        return Err(ProbeError::Disabled);
    }
    // glommio panics rather than fails when the io_uring calls are refused, so ask the
    // kernel for a ring first.
    drop(io_uring::IoUring::new(4).map_err(classify_io)?);
    // Build an executor the way the cores will, on a thread of its own, and drop it.
    std::thread::spawn(|| {
        glommio::LocalExecutorBuilder::default()
            .io_memory(IO_MEMORY)
            .make()
            .map(drop)
            .map_err(classify)
    })
    .join()
    .map_err(|_| ProbeError::Other("the probe thread panicked".into()))?
}

fn check_memlock() -> Result<(), ProbeError> {
    let (soft, hard) = Resource::MEMLOCK
        .get()
        .map_err(|e| ProbeError::Other(format!("getrlimit: {e}")))?;
    if soft >= MIN_MEMLOCK {
        return Ok(());
    }
    if hard >= MIN_MEMLOCK && Resource::MEMLOCK.set(hard, hard).is_ok() {
        tracing::info!(
            from = soft,
            to = hard,
            "Raised the soft locked-memory limit to the hard limit for io_uring"
        );
        return Ok(());
    }
    Err(ProbeError::Memlock { soft })
}

/// Maps a glommio start-up error to its cause.
pub fn classify<T>(e: glommio::GlommioError<T>) -> ProbeError {
    use glommio::GlommioError as G;
    let io = match e {
        G::IoError(io) => io,
        G::EnhancedIoError { source, .. } => source,
        G::ReactorError(glommio::ReactorErrorKind::MemLockLimit(soft, _)) => {
            return ProbeError::Memlock { soft };
        }
        other => return ProbeError::Other(other.to_string()),
    };
    classify_io(io)
}

fn classify_io(io: io::Error) -> ProbeError {
    match io.raw_os_error() {
        Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => ProbeError::Blocked(io),
        Some(nix::libc::ENOSYS) => ProbeError::NoUring(io),
        Some(nix::libc::ENOMEM) => ProbeError::Memlock {
            soft: Resource::MEMLOCK.get().map_or(0, |l| l.0),
        },
        _ => ProbeError::Other(io.to_string()),
    }
}
