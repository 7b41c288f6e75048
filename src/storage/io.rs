//! The narrow file-I/O interface every byte Courier keeps on disk passes
//! through.
//!
//! [`Fs`] and [`File`] name exactly the operations the storage layer uses:
//! open, positional read and write, length, fdatasync, truncate, rename,
//! delete and directory sync. [`OsFs`] maps them onto the operating system.
//! [`SimFs`] is an in-memory model of a page cache over a disk: writes land
//! in the cache, `sync_data` makes a file's contents durable, `sync_dir`
//! makes a directory's entries (creations, renames, deletions) durable, and
//! [`SimFs::power_loss`] throws away everything that was not, and
//! [`SimFs::set_fail_syncs`] makes syncs fail. Tests use it to check that
//! every promise of durability is backed by the right sync, and what a
//! failed sync does.
//!
//! [`Fs::whole_sync`] offers, where it can be trusted, one call that makes
//! every file of a file system durable (`syncfs(2)`), so that the writer
//! pool makes a round that wrote many files durable with one sync.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

/// Creates `dir` and its missing parents, and makes each created entry
/// durable by syncing the directory it was created in: without that, a
/// power cut can take a new directory, fdatasync'd files and all.
pub fn create_dir_all_durable(fs: &dyn Fs, dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !fs.exists(at) {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs.create_dir_all(dir)?;
    for created in missing.iter().rev() {
        match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => fs.sync_dir(parent)?,
            _ => fs.sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// A file opened through [`Fs`]. Shared by the writer and readers of a log.
// `len` is a file's size; an `is_empty` would add nothing to this interface.
#[allow(clippy::len_without_is_empty)]
pub trait File: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `pos`; returns how many were read
    /// (fewer only at end of file).
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// Writes all of `data` at `pos`.
    fn write_at(&self, data: &[u8], pos: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Makes the file's contents durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Cuts the file to `len` bytes.
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// Reserves disk space for the first `len` bytes without changing the
    /// file's length (fallocate with KEEP_SIZE), so later writes there
    /// cannot fail for want of space. A file system without it is not an
    /// error: nothing is reserved.
    fn reserve(&self, len: u64) -> io::Result<()>;

    /// Reads exactly `buf.len()` bytes at `pos` or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], pos + done as u64)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}

/// How [`Fs::open`] treats a missing or existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Open an existing file for reading and writing.
    Existing,
    /// Create the file; fail if it exists.
    CreateNew,
    /// Create the file or truncate an existing one to zero.
    CreateTruncate,
}

/// The file-system operations of the storage layer.
pub trait Fs: Send + Sync + std::fmt::Debug + 'static {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of a directory, sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries durable (fsync of the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// One sync that makes the contents of every file on the file system
    /// holding `dir` durable and reports any file's write-back error, or
    /// `None` where no such sync can be trusted (the writer pool then
    /// syncs each file it wrote).
    fn whole_sync(&self, dir: &Path) -> Option<Arc<dyn WholeSync>> {
        let _ = dir;
        None
    }
}

/// A sync of every file of one file system (see [`Fs::whole_sync`]).
pub trait WholeSync: Send + Sync + std::fmt::Debug {
    /// The file system it syncs: two handles with one id sync the same files.
    fn id(&self) -> u64;
    /// Makes every file's written contents durable. An error says some
    /// file's write-back failed, not which one: syncing each file on its
    /// own then tells.
    fn sync_all(&self) -> io::Result<()>;
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFs;

#[derive(Debug)]
struct OsFile(std::fs::File);

impl File for OsFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.0.read_at(buf, pos)
    }
    fn write_at(&self, data: &[u8], pos: u64) -> io::Result<()> {
        self.0.write_all_at(data, pos)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn reserve(&self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a valid open descriptor; fallocate has no memory effects.
        let rc = unsafe { libc::fallocate(self.0.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => Ok(()),
            _ => Err(err),
        }
    }
}

impl Fs for OsFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true);
        match mode {
            OpenMode::Existing => {}
            OpenMode::CreateNew => {
                options.create_new(true);
            }
            OpenMode::CreateTruncate => {
                options.create(true).truncate(true);
            }
        }
        Ok(Arc::new(OsFile(options.open(path)?)))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::File::open(path)?.sync_all()
    }
    fn whole_sync(&self, dir: &Path) -> Option<Arc<dyn WholeSync>> {
        os_whole_sync(dir).map(|s| s as Arc<dyn WholeSync>)
    }
}

/// `syncfs(2)` of one file system, through a directory kept open on it.
#[derive(Debug)]
struct SyncFs {
    dev: u64,
    dir: std::fs::File,
}

impl WholeSync for SyncFs {
    fn id(&self) -> u64 {
        self.dev
    }
    fn sync_all(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; syncfs has no memory effects.
        if unsafe { libc::syncfs(self.dir.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// File systems whose `syncfs` writes back every dirty file, commits it
/// (journal and device cache flush) and, since Linux 5.8, returns the
/// write-back errors of any file: ext4 (and ext2/3, same magic), XFS,
/// btrfs. Others (FUSE, NFS, overlay, tmpfs, …) are not trusted: FUSE
/// may not pass `syncfs` to its server at all.
const SYNCFS_TRUSTED: [i64; 3] = [0xEF53, 0x5846_5342, 0x9123_683E];

/// The kernel reports write-back errors from `syncfs` (5.8 and later).
fn kernel_reports_syncfs_errors() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
            return false;
        };
        let mut parts = release.trim().split(['.', '-']);
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor) >= (5, 8)
    })
}

/// One `SyncFs` per file system for the whole process (a directory
/// descriptor each), made on first use; `None` where not trusted.
fn os_whole_sync(dir: &Path) -> Option<Arc<SyncFs>> {
    use std::os::unix::fs::MetadataExt;
    type Known = std::collections::HashMap<u64, Option<Arc<SyncFs>>>;
    static KNOWN: std::sync::OnceLock<Mutex<Known>> = std::sync::OnceLock::new();
    if !kernel_reports_syncfs_errors() {
        return None;
    }
    let dev = std::fs::metadata(dir).ok()?.dev();
    let mut known = KNOWN.get_or_init(Default::default).lock();
    if let Some(found) = known.get(&dev) {
        return found.clone();
    }
    let file = std::fs::File::open(dir).ok()?;
    let found = fs_type(&file)
        .filter(|t| SYNCFS_TRUSTED.contains(t))
        .map(|_| Arc::new(SyncFs { dev, dir: file }));
    known.insert(dev, found.clone());
    found
}

/// The `statfs` magic number of the file system holding `file`.
fn fs_type(file: &std::fs::File) -> Option<i64> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a valid descriptor and a buffer of the right type and size.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: fstatfs filled it.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
    Some(st.f_type as i64)
}

/// An in-memory file system that models a volatile page cache.
///
/// Each file has cached contents (what reads see) and durable contents (what
/// survives [`SimFs::power_loss`]). The namespace is modelled the same way:
/// creating, renaming or removing an entry changes the cached namespace; only
/// `sync_dir` of the parent makes it durable. Directories themselves are
/// treated as durable once created.
#[derive(Debug, Default, Clone)]
pub struct SimFs {
    inner: Arc<Mutex<SimState>>,
    reads: Arc<ReadGate>,
}

/// Holds reads of files below a directory until released, to catch code
/// that reads a file while holding a lock others need.
#[derive(Debug, Default)]
struct ReadGate {
    held_under: Mutex<Option<PathBuf>>,
    released: parking_lot::Condvar,
    waiting: std::sync::atomic::AtomicU64,
}

impl ReadGate {
    fn pass(&self, path: &Path) {
        let mut held = self.held_under.lock();
        let holds = |held: &Option<PathBuf>| held.as_ref().is_some_and(|dir| path.starts_with(dir));
        if !holds(&held) {
            return;
        }
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        while holds(&held) {
            self.released.wait(&mut held);
        }
        self.waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct SimState {
    /// Cached namespace: path -> inode.
    cached: BTreeMap<PathBuf, u64>,
    /// Durable namespace: path -> inode.
    durable: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    inodes: BTreeMap<u64, Arc<SimInode>>,
    next_inode: u64,
    /// Count of sync_data calls, for tests that check the write path.
    syncs: u64,
    /// When set, every sync_data fails (a failpoint for error paths).
    fail_syncs: bool,
    /// Syncs of files below this directory fail (one log's disk failing).
    fail_syncs_under: Option<PathBuf>,
    /// Offer a whole sync (a model of a trusted `syncfs`).
    whole_sync: bool,
    /// Count of whole syncs.
    whole_syncs: u64,
    /// When set, the bytes files may still grow by: a write past it writes
    /// what fits and fails with ENOSPC (a full disk).
    space_left: Option<u64>,
}

#[derive(Debug, Default)]
struct SimInode {
    data: Mutex<SimData>,
}

#[derive(Debug, Default, Clone)]
struct SimData {
    cached: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug)]
struct SimFile {
    inode: Arc<SimInode>,
    fs: Arc<Mutex<SimState>>,
    reads: Arc<ReadGate>,
    /// The path it was opened by (for `fail_syncs_under`).
    path: PathBuf,
}

impl File for SimFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.reads.pass(&self.path);
        let data = self.inode.data.lock();
        let pos = usize::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
        if pos >= data.cached.len() {
            return Ok(0);
        }
        let n = buf.len().min(data.cached.len() - pos);
        buf[..n].copy_from_slice(&data.cached[pos..pos + n]);
        Ok(n)
    }
    fn write_at(&self, bytes: &[u8], pos: u64) -> io::Result<()> {
        let mut state = self.fs.lock();
        let mut data = self.inode.data.lock();
        let pos = usize::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut bytes = bytes;
        let mut full = false;
        if let Some(left) = state.space_left.as_mut() {
            let growth = (pos + bytes.len()).saturating_sub(data.cached.len().max(pos));
            let room = usize::try_from(*left).unwrap_or(usize::MAX);
            if growth > room {
                // Like a real disk: the part that fits is written.
                let fits = bytes.len() - (growth - room);
                bytes = &bytes[..fits];
                full = true;
            }
            let grown = (pos + bytes.len()).saturating_sub(data.cached.len().max(pos));
            *left -= grown as u64;
        }
        let end = pos + bytes.len();
        if data.cached.len() < end {
            data.cached.resize(end, 0);
        }
        data.cached[pos..end].copy_from_slice(bytes);
        if full {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.inode.data.lock().cached.len() as u64)
    }
    fn sync_data(&self) -> io::Result<()> {
        if self.fs.lock().fails_sync(&self.path) {
            return Err(io::Error::other("injected sync failure"));
        }
        {
            let mut data = self.inode.data.lock();
            data.durable = data.cached.clone();
        }
        // Lock order is always state, then inode (see power_loss, corrupt,
        // open): never take the state lock while holding an inode's lock.
        self.fs.lock().syncs += 1;
        Ok(())
    }
    fn reserve(&self, len: u64) -> io::Result<()> {
        // The model does not track reserved blocks: a reserve that fits in
        // the space left succeeds and takes nothing.
        let state = self.fs.lock();
        let data = self.inode.data.lock();
        let want = len.saturating_sub(data.cached.len() as u64);
        if state.space_left.is_some_and(|left| want > left) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut state = self.fs.lock();
        let mut data = self.inode.data.lock();
        if let Some(left) = state.space_left.as_mut() {
            *left += data.cached.len().saturating_sub(len) as u64;
        }
        data.cached.resize(len, 0);
        Ok(())
    }
}

fn not_found() -> io::Error {
    io::ErrorKind::NotFound.into()
}

impl SimState {
    fn fails_sync(&self, path: &Path) -> bool {
        self.fail_syncs
            || self
                .fail_syncs_under
                .as_ref()
                .is_some_and(|dir| path.starts_with(dir))
    }
}

/// [`SimFs`]'s whole sync: every file's contents become durable, except
/// those of files whose syncs fail, and then the sync fails.
#[derive(Debug)]
struct SimWholeSync {
    fs: Arc<Mutex<SimState>>,
}

impl WholeSync for SimWholeSync {
    fn id(&self) -> u64 {
        Arc::as_ptr(&self.fs) as u64
    }
    fn sync_all(&self) -> io::Result<()> {
        let mut state = self.fs.lock();
        if state.fail_syncs {
            return Err(io::Error::other("injected sync failure"));
        }
        let mut failed = false;
        for (path, ino) in &state.cached {
            if state.fails_sync(path) {
                failed = true;
                continue;
            }
            let mut data = state.inodes[ino].data.lock();
            data.durable = data.cached.clone();
        }
        state.whole_syncs += 1;
        if failed {
            return Err(io::Error::other("injected sync failure"));
        }
        Ok(())
    }
}

impl SimFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a power loss: every unsynced write and every namespace
    /// change not covered by a `sync_dir` is lost. Open handles keep
    /// pointing at the old inodes; callers reopen everything afterwards.
    pub fn power_loss(&self) {
        let mut state = self.inner.lock();
        state.cached = state.durable.clone();
        let live: BTreeSet<u64> = state.durable.values().copied().collect();
        state.inodes.retain(|ino, _| live.contains(ino));
        for inode in state.inodes.values() {
            let mut data = inode.data.lock();
            data.cached = data.durable.clone();
        }
    }

    /// Limits how many more bytes files may grow by (`None`: unlimited); a
    /// write past the limit writes what fits and fails with ENOSPC.
    pub fn set_space_left(&self, bytes: Option<u64>) {
        self.inner.lock().space_left = bytes;
    }

    /// Makes every later `sync_data` fail (or succeed again).
    pub fn set_fail_syncs(&self, fail: bool) {
        self.inner.lock().fail_syncs = fail;
    }

    /// Makes syncs of every file below `dir` fail (or, with `None`,
    /// succeed again), whether synced one by one or by a whole sync.
    pub fn set_fail_syncs_under(&self, dir: Option<&Path>) {
        self.inner.lock().fail_syncs_under = dir.map(Path::to_path_buf);
    }

    /// Offers [`Fs::whole_sync`] (off by default: like FUSE, the model
    /// then only knows per-file syncs).
    pub fn set_whole_sync(&self, on: bool) {
        self.inner.lock().whole_sync = on;
    }

    /// Makes every read of a file below `dir` wait until this is called
    /// again with `None` (or another directory).
    pub fn hold_reads_under(&self, dir: Option<&Path>) {
        *self.reads.held_under.lock() = dir.map(Path::to_path_buf);
        self.reads.released.notify_all();
    }

    /// How many reads are waiting on [`SimFs::hold_reads_under`] now.
    pub fn reads_held(&self) -> u64 {
        self.reads.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Number of `sync_data` calls so far.
    pub fn sync_count(&self) -> u64 {
        self.inner.lock().syncs
    }

    /// Number of whole syncs so far.
    pub fn whole_sync_count(&self) -> u64 {
        self.inner.lock().whole_syncs
    }

    /// Mutates the cached and durable contents of a file in place (for
    /// corruption tests). Returns false if the file does not exist.
    pub fn corrupt(&self, path: &Path, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let state = self.inner.lock();
        let Some(ino) = state.cached.get(path) else {
            return false;
        };
        let mut data = state.inodes[ino].data.lock();
        f(&mut data.cached);
        data.durable = data.cached.clone();
        true
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let mut state = self.inner.lock();
        if let Some(parent) = path.parent() {
            if !state.dirs.contains(parent) {
                return Err(not_found());
            }
        }
        let existing = state.cached.get(path).copied();
        let inode = match (mode, existing) {
            (OpenMode::Existing, None) => return Err(not_found()),
            (OpenMode::CreateNew, Some(_)) => return Err(io::ErrorKind::AlreadyExists.into()),
            (OpenMode::Existing, Some(ino)) => state.inodes[&ino].clone(),
            (OpenMode::CreateTruncate, Some(ino)) => {
                let inode = state.inodes[&ino].clone();
                inode.data.lock().cached.clear();
                inode
            }
            (_, None) => {
                state.next_inode += 1;
                let ino = state.next_inode;
                let inode = Arc::new(SimInode::default());
                state.inodes.insert(ino, inode.clone());
                state.cached.insert(path.to_path_buf(), ino);
                inode
            }
        };
        Ok(Arc::new(SimFile {
            inode,
            fs: self.inner.clone(),
            reads: self.reads.clone(),
            path: path.to_path_buf(),
        }))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        for ancestor in path.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let state = self.inner.lock();
        if !state.dirs.contains(path) {
            return Err(not_found());
        }
        let files = state.cached.keys();
        let dirs = state.dirs.iter();
        let mut names: Vec<String> = files
            .chain(dirs)
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
    fn exists(&self, path: &Path) -> bool {
        let state = self.inner.lock();
        state.cached.contains_key(path) || state.dirs.contains(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        if state.dirs.contains(from) {
            // Directory renames move every entry below; treated as durable
            // at once (the storage layer syncs the parent right after).
            let moved: Vec<PathBuf> = state
                .dirs
                .iter()
                .filter(|d| d.starts_with(from))
                .cloned()
                .collect();
            for d in moved {
                state.dirs.remove(&d);
                state
                    .dirs
                    .insert(to.join(d.strip_prefix(from).unwrap_or(&d)));
            }
            let SimState {
                cached, durable, ..
            } = &mut *state;
            for map in [cached, durable] {
                let keys: Vec<PathBuf> = map
                    .keys()
                    .filter(|p| p.starts_with(from))
                    .cloned()
                    .collect();
                for k in keys {
                    let ino = map.remove(&k).unwrap_or_default();
                    map.insert(to.join(k.strip_prefix(from).unwrap_or(&k)), ino);
                }
            }
            return Ok(());
        }
        let ino = state.cached.remove(from).ok_or_else(not_found)?;
        state.cached.insert(to.to_path_buf(), ino);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        state.cached.remove(path).ok_or_else(not_found)?;
        Ok(())
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        state.dirs.retain(|d| !d.starts_with(path));
        state.cached.retain(|p, _| !p.starts_with(path));
        state.durable.retain(|p, _| !p.starts_with(path));
        Ok(())
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.inner.lock();
        let cached: Vec<(PathBuf, u64)> = state
            .cached
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        state.durable.retain(|p, _| p.parent() != Some(path));
        state.durable.extend(cached);
        Ok(())
    }
    fn whole_sync(&self, _dir: &Path) -> Option<Arc<dyn WholeSync>> {
        self.inner.lock().whole_sync.then(|| {
            Arc::new(SimWholeSync {
                fs: self.inner.clone(),
            }) as Arc<dyn WholeSync>
        })
    }
}
