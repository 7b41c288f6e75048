//! PowerFs: an in-memory FUSE file system for power-loss tests of the whole
//! `courier serve` binary.
//!
//! It keeps two views of everything: the *current* one, which every
//! process using the mount sees, and the *durable* one, which is what a
//! disk would still hold after the power went out. Nothing reaches the
//! durable view except through a sync, and each sync covers exactly what
//! POSIX promises:
//!
//! - fsync / fdatasync of a file makes that file's contents and size
//!   durable (not its name: a file is only reachable after a cut if every
//!   directory on its path had the entry fsynced);
//! - fsync of a directory makes that directory's entries durable: the
//!   creations, renames and removals within it.
//!
//! [`PowerFs::cut`] is the power loss: every file's contents and every
//! directory's entries become their durable versions, and whatever is no
//! longer reachable from the root is gone. The caller kills (SIGKILL) and
//! reaps the process using the mount first.
//!
//! Files are opened with `FOPEN_DIRECT_IO` and every entry and attribute
//! is given a zero TTL, so the kernel caches nothing that a cut could make
//! stale: each read, write, lookup and stat reaches this model. Inode
//! numbers are never reused. mmap is not supported (direct I/O), and
//! neither are hard links, symlinks, device nodes or xattrs; the broker
//! and sled use none of them. `flock` works: the kernel keeps those locks
//! itself when the file system does not implement them.
//!
//! [`MountOptions::silly_rename`] makes it behave like an NFS client where
//! removing a file that is still open is concerned: the file is renamed to
//! a hidden `.nfs…` entry in the same directory (unlinking that entry while
//! the file is open fails with EBUSY), the entry goes when the last handle
//! is released, and until then the directory is not empty (rmdir fails
//! with ENOTEMPTY). A file replaced by a rename while open is hidden the
//! same way. Some FUSE file systems behave alike (libfuse's `hide`).
//!
//! Mounting needs root and `/dev/fuse`; [`PowerFs::unavailable`] says why
//! not. fuser is built without libfuse: as root it calls mount(2) itself,
//! so neither libfuse headers nor `fusermount` are needed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use parking_lot::Mutex;

/// The kernel caches no entry and no attribute (see the module doc).
const TTL: Duration = Duration::ZERO;
const BLOCK_SIZE: u32 = 4096;
/// What statfs reports: 1 TiB, all of it free.
const STATFS_BLOCKS: u64 = 1 << 28;
const ROOT: u64 = INodeNo::ROOT.0;

/// Counts of what the mount was asked to do, for tests to check that the
/// syncs they rely on reach the file system at all.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// fsync / fdatasync of files.
    pub file_syncs: u64,
    /// fsync of directories.
    pub dir_syncs: u64,
    pub writes: u64,
    pub cuts: u64,
}

#[derive(Debug, Default)]
struct FileNode {
    /// What reads see.
    data: Vec<u8>,
    /// What survives a cut.
    durable: Vec<u8>,
    /// Bytes written since the last sync: `[start, end)`.
    dirty: Option<(usize, usize)>,
    /// The smallest length the file had since the last sync; bytes past it
    /// in `durable` are stale once the file has been cut shorter.
    shrunk_to: usize,
}

impl FileNode {
    fn mark(&mut self, start: usize, end: usize) {
        if start < end {
            self.dirty = Some(match self.dirty {
                Some((s, e)) => (s.min(start), e.max(end)),
                None => (start, end),
            });
        }
    }

    fn write_at(&mut self, pos: usize, bytes: &[u8]) {
        let end = pos + bytes.len();
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        self.data[pos..end].copy_from_slice(bytes);
        self.mark(pos, end);
    }

    fn set_len(&mut self, len: usize) {
        self.shrunk_to = self.shrunk_to.min(len);
        // Bytes past the old end read as zeros; the durable copy learns
        // that from `shrunk_to` and the zero fill in `sync`.
        self.data.resize(len, 0);
    }

    /// fsync / fdatasync: the contents and length become durable.
    fn sync(&mut self) {
        let len = self.data.len();
        self.durable.truncate(self.shrunk_to);
        self.durable.resize(len, 0);
        if let Some((start, end)) = self.dirty.take() {
            let end = end.min(len);
            if start < end {
                self.durable[start..end].copy_from_slice(&self.data[start..end]);
            }
        }
        self.shrunk_to = len;
        debug_assert!(self.durable == self.data);
    }

    fn cut(&mut self) {
        self.data.clone_from(&self.durable);
        self.dirty = None;
        self.shrunk_to = self.data.len();
    }
}

#[derive(Debug, Default)]
struct DirNode {
    entries: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    /// For `..` and rename loop checks; follows the current view.
    parent: u64,
}

#[derive(Debug)]
enum Kind {
    File(FileNode),
    Dir(DirNode),
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Node {
    fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Node {
        let now = SystemTime::now();
        Node {
            kind,
            perm,
            uid,
            gid,
            mtime: now,
            ctime: now,
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, size, nlink) = match &self.kind {
            Kind::File(f) => (FileType::RegularFile, f.data.len() as u64, 1),
            Kind::Dir(_) => (FileType::Directory, u64::from(BLOCK_SIZE), 2),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.ctime,
            kind,
            perm: self.perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// How a PowerFs behaves beyond POSIX.
#[derive(Debug, Default, Clone, Copy)]
pub struct MountOptions {
    /// Removing an open file hides it as `.nfs…` until it is closed (see
    /// the module doc).
    pub silly_rename: bool,
}

/// Prefix of the entries [`MountOptions::silly_rename`] hides files under.
pub const HIDDEN_PREFIX: &str = ".nfs";

#[derive(Debug)]
struct Tree {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    stats: Stats,
    options: MountOptions,
    /// Open handles per file inode (open and create minus release).
    open: HashMap<u64, u32>,
    /// Files hidden by a silly rename: inode -> (directory, hidden name).
    hidden: HashMap<u64, (u64, OsString)>,
    next_hidden: u64,
}

type Result<T> = std::result::Result<T, Errno>;

impl Tree {
    fn new(options: MountOptions) -> Tree {
        // SAFETY: geteuid and getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let root = Node::new(
            Kind::Dir(DirNode {
                parent: ROOT,
                ..DirNode::default()
            }),
            0o755,
            uid,
            gid,
        );
        Tree {
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            stats: Stats::default(),
            options,
            open: HashMap::new(),
            hidden: HashMap::new(),
            next_hidden: 0,
        }
    }

    fn opened(&mut self, ino: u64) {
        *self.open.entry(ino).or_default() += 1;
    }

    /// The last handle of a file went: a hidden entry of it goes too.
    fn released(&mut self, ino: u64) {
        let Some(n) = self.open.get_mut(&ino) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.open.remove(&ino);
        if let Some((parent, name)) = self.hidden.remove(&ino) {
            if let Ok(dir) = self.dir_mut(parent) {
                if dir.entries.get(&name) == Some(&ino) {
                    dir.entries.remove(&name);
                }
            }
        }
    }

    /// Under silly rename, whether `ino` is a file some handle has open.
    fn busy(&self, ino: u64) -> bool {
        self.options.silly_rename && self.open.get(&ino).is_some_and(|n| *n > 0)
    }

    /// Moves the open file `name` of `parent` to a hidden entry there.
    fn hide(&mut self, parent: u64, name: &OsStr, ino: u64) -> Result<()> {
        let hidden = OsString::from(format!("{HIDDEN_PREFIX}{ino:016x}{:08x}", self.next_hidden));
        self.next_hidden += 1;
        let dir = self.dir_mut(parent)?;
        dir.entries.remove(name);
        dir.entries.insert(hidden.clone(), ino);
        self.hidden.insert(ino, (parent, hidden));
        self.node_mut(parent)?.touch();
        Ok(())
    }

    fn node(&self, ino: u64) -> Result<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&DirNode> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirNode> {
        match &mut self.node_mut(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileNode> {
        match &mut self.node_mut(ino)?.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn is_dir(&self, ino: u64) -> bool {
        matches!(self.nodes.get(&ino).map(|n| &n.kind), Some(Kind::Dir(_)))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<u64> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64) -> Result<FileAttr> {
        Ok(self.node(ino)?.attr(ino))
    }

    /// Adds a new node named `name` in `parent`.
    fn insert(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64> {
        let dir = self.dir(parent)?;
        if dir.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.node_mut(parent)?.touch();
        Ok(ino)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<()> {
        let ino = self.child(parent, name)?;
        match (&self.node(ino)?.kind, want_dir) {
            (Kind::Dir(_), false) => return Err(Errno::EISDIR),
            (Kind::File(_), true) => return Err(Errno::ENOTDIR),
            (Kind::Dir(d), true) if !d.entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        if !want_dir && self.busy(ino) {
            if self.hidden.contains_key(&ino) {
                // What an NFS client answers for its own .nfs file.
                return Err(Errno::EBUSY);
            }
            return self.hide(parent, name, ino);
        }
        // The node itself stays: open handles still use it, and the
        // durable view may still name it.
        self.dir_mut(parent)?.entries.remove(name);
        self.node_mut(parent)?.touch();
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<()> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        let ino = self.child(parent, name)?;
        self.dir(new_parent)?;
        let src_is_dir = self.is_dir(ino);
        if let Some(&target) = self.dir(new_parent)?.entries.get(new_name) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (src_is_dir, &self.node(target)?.kind) {
                (true, Kind::File(_)) => return Err(Errno::ENOTDIR),
                (false, Kind::Dir(_)) => return Err(Errno::EISDIR),
                (true, Kind::Dir(d)) if !d.entries.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
            if self.busy(target) && !self.hidden.contains_key(&target) {
                self.hide(new_parent, new_name, target)?;
            }
        }
        if src_is_dir {
            // A directory cannot move below itself.
            let mut up = new_parent;
            loop {
                if up == ino {
                    return Err(Errno::EINVAL);
                }
                if up == ROOT {
                    break;
                }
                up = self.dir(up)?.parent;
            }
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(new_parent)?
            .entries
            .insert(new_name.to_owned(), ino);
        if let Kind::Dir(d) = &mut self.node_mut(ino)?.kind {
            d.parent = new_parent;
        }
        self.node_mut(ino)?.ctime = SystemTime::now();
        self.node_mut(parent)?.touch();
        self.node_mut(new_parent)?.touch();
        Ok(())
    }

    fn sync(&mut self, ino: u64) -> Result<()> {
        match &mut self.node_mut(ino)?.kind {
            Kind::File(f) => {
                f.sync();
                self.stats.file_syncs += 1;
            }
            Kind::Dir(d) => {
                d.durable.clone_from(&d.entries);
                self.stats.dir_syncs += 1;
            }
        }
        Ok(())
    }

    /// The power loss: only the durable view is left.
    fn cut(&mut self) {
        for node in self.nodes.values_mut() {
            match &mut node.kind {
                Kind::File(f) => f.cut(),
                Kind::Dir(d) => d.entries.clone_from(&d.durable),
            }
        }
        let mut live = HashSet::new();
        let mut parents = Vec::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if !live.insert(ino) {
                continue;
            }
            if let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get(&ino)
            {
                for &child in d.entries.values() {
                    parents.push((child, ino));
                    stack.push(child);
                }
            }
        }
        self.nodes.retain(|ino, _| live.contains(ino));
        // The process using the mount is dead: nothing is open any more.
        self.open.clear();
        self.hidden.clear();
        for (child, parent) in parents {
            if let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get_mut(&child)
            {
                d.parent = parent;
            }
        }
        self.stats.cuts += 1;
    }
}

/// The file-system side, driven by fuser's session thread.
struct Model {
    tree: Arc<Mutex<Tree>>,
}

fn mode_perm(mode: u32, umask: u32) -> u16 {
    // The permission bits fit in 12 bits by the mask.
    ((mode & !umask) & 0o7777) as u16
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Errno::EFBIG)
}

impl Filesystem for Model {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let tree = self.tree.lock();
        match tree.child(parent.0, name).and_then(|ino| tree.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree.lock().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut tree = self.tree.lock();
        let result = (|| {
            if let Some(size) = size {
                let size = to_usize(size)?;
                tree.file_mut(ino.0)?.set_len(size);
                tree.node_mut(ino.0)?.touch();
            }
            let node = tree.node_mut(ino.0)?;
            if let Some(mode) = mode {
                node.perm = mode_perm(mode, 0);
            }
            if let Some(uid) = uid {
                node.uid = uid;
            }
            if let Some(gid) = gid {
                node.gid = gid;
            }
            match mtime {
                Some(TimeOrNow::SpecificTime(t)) => node.mtime = t,
                Some(TimeOrNow::Now) => node.mtime = SystemTime::now(),
                None => {}
            }
            if mode.is_some() || uid.is_some() || gid.is_some() {
                node.ctime = SystemTime::now();
            }
            tree.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut tree = self.tree.lock();
        let node = Node::new(
            Kind::Dir(DirNode {
                parent: parent.0,
                ..DirNode::default()
            }),
            mode_perm(mode, umask),
            req.uid(),
            req.gid(),
        );
        match tree
            .insert(parent.0, name, node)
            .and_then(|ino| tree.attr(ino))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.tree.lock().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.tree.lock().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .tree
            .lock()
            .rename(parent.0, name, newparent.0, newname, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC arrives as a setattr (no atomic_o_trunc).
        let mut tree = self.tree.lock();
        match tree.node(ino.0).map(|n| &n.kind) {
            Ok(Kind::File(_)) => {
                tree.opened(ino.0);
                reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
            }
            Ok(Kind::Dir(_)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut tree = self.tree.lock();
        let result = (|| {
            let f = tree.file_mut(ino.0)?;
            let start = to_usize(offset)?.min(f.data.len());
            let end = start.saturating_add(size as usize).min(f.data.len());
            Ok(f.data[start..end].to_vec())
        })();
        drop(tree);
        match result {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut tree = self.tree.lock();
        let result = (|| {
            let pos = to_usize(offset)?;
            tree.file_mut(ino.0)?.write_at(pos, data);
            tree.node_mut(ino.0)?.touch();
            tree.stats.writes += 1;
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        })();
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.tree.lock().released(ino.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.tree.lock().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.tree.lock().dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let tree = self.tree.lock();
        let dir = match tree.dir(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let mut all: Vec<(u64, FileType, OsString)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (dir.parent, FileType::Directory, "..".into()),
        ];
        for (name, &child) in &dir.entries {
            let kind = if tree.is_dir(child) {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            all.push((child, kind, name.clone()));
        }
        drop(tree);
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.tree.lock().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            STATFS_BLOCKS,
            STATFS_BLOCKS,
            STATFS_BLOCKS,
            1 << 20,
            1 << 20,
            BLOCK_SIZE,
            255,
            BLOCK_SIZE,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.tree.lock().node(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut tree = self.tree.lock();
        let result = (|| match tree.child(parent.0, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
            Ok(ino) => {
                if flags & libc::O_TRUNC != 0 {
                    tree.file_mut(ino)?.set_len(0);
                } else {
                    tree.file_mut(ino)?;
                }
                tree.attr(ino)
            }
            Err(_) => {
                let node = Node::new(
                    Kind::File(FileNode::default()),
                    mode_perm(mode, umask),
                    req.uid(),
                    req.gid(),
                );
                let ino = tree.insert(parent.0, name, node)?;
                tree.attr(ino)
            }
        })();
        if let Ok(attr) = &result {
            tree.opened(attr.ino.0);
        }
        match result {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut tree = self.tree.lock();
        let result = (|| {
            let f = tree.file_mut(ino.0)?;
            match mode {
                // Reserving space: memory needs none.
                libc::FALLOC_FL_KEEP_SIZE => Ok(()),
                0 => {
                    let end = to_usize(offset.checked_add(length).ok_or(Errno::EFBIG)?)?;
                    if end > f.data.len() {
                        f.set_len(end);
                    }
                    Ok(())
                }
                _ => Err(Errno::EOPNOTSUPP),
            }
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted PowerFs; unmounted on drop.
pub struct PowerFs {
    tree: Arc<Mutex<Tree>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl PowerFs {
    /// Why PowerFs cannot be mounted here (not root, no `/dev/fuse`), or
    /// `None` if it can.
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some("not running as root".into());
        }
        if !Path::new("/dev/fuse").exists() {
            return Some("/dev/fuse does not exist".into());
        }
        None
    }

    /// Mounts an empty PowerFs on `dir` (an existing, empty directory).
    ///
    /// # Panics
    /// If the mount fails.
    pub fn mount(dir: &Path) -> PowerFs {
        Self::mount_with(dir, MountOptions::default())
    }

    /// Like [`PowerFs::mount`], with `options`.
    ///
    /// # Panics
    /// If the mount fails.
    pub fn mount_with(dir: &Path, options: MountOptions) -> PowerFs {
        let tree = Arc::new(Mutex::new(Tree::new(options)));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powerfs".into()),
            MountOption::Subtype("powerfs".into()),
        ];
        let model = Model { tree: tree.clone() };
        let session = fuser::spawn_mount(model, dir, &config)
            .unwrap_or_else(|e| panic!("mount PowerFs on {}: {e}", dir.display()));
        PowerFs {
            tree,
            mountpoint: dir.to_path_buf(),
            session: Some(session),
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Power loss: everything not made durable by a sync is gone. The
    /// process that used the mount must be dead (killed and reaped).
    pub fn cut(&self) {
        self.tree.lock().cut();
    }

    pub fn stats(&self) -> Stats {
        self.tree.lock().stats
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if let Err(e) = session.umount_and_join() {
            // Busy (a process still has files open): detach it, so the
            // directory can go; the kernel ends the session once idle.
            eprintln!(
                "PowerFs: unmount {}: {e}; detaching",
                self.mountpoint.display()
            );
            if let Ok(path) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes())
            {
                // SAFETY: a valid NUL-terminated path.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}
