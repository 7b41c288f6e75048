//! Accounting for every directory at open: each topic and subscription
//! directory is matched with its definition before anything is served.
//!
//! The promise: **startup never deletes data it cannot account for.**
//!
//! - A directory whose definition is in the metadata store is in use; its
//!   definition file is rewritten if missing or out of date (data
//!   directories of earlier versions have none).
//! - A directory the store does not know, with a valid definition file, is
//!   a definition the store lost (a power cut right after the change, or a
//!   damaged store): the definition is restored into the store, loudly.
//! - `{id}.deleting` is a deletion in progress. If the store still has the
//!   definition, the deletion never happened (it failed or the process
//!   died before the definition went): the directory is renamed back.
//!   Otherwise the deletion was acknowledged and the directory is removed.
//! - Anything else (no definition anywhere, an unreadable definition file,
//!   a name clash, a subscription whose topic is gone, a stray name) is
//!   moved to `lost+found/` with an error log naming it, never removed.
//!
//! Every rename is followed by an fsync of the directories involved.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::broker::error::Result;
use crate::storage::definition;
use crate::storage::io::Fs;
use crate::storage::meta::{MetaStore, SubscriptionDef, TopicDef};
use crate::storage::{StorageError, state::SubscriptionState};

/// Directory under the data directory where unaccounted data is set aside.
pub const DIR_LOST_FOUND: &str = "lost+found";
/// Suffix of a directory being deleted.
pub const DELETING_SUFFIX: &str = ".deleting";
/// Kind names of definition files.
pub const KIND_TOPIC: &str = "topic";
pub const KIND_SUBSCRIPTION: &str = "subscription";

/// What a data directory holds once accounted for.
#[derive(Debug, Default)]
pub struct Accounted {
    pub topics: Vec<TopicDef>,
    pub subscriptions: Vec<SubscriptionDef>,
    /// Directories moved to `lost+found/`.
    pub set_aside: usize,
    /// Definitions restored from definition files.
    pub restored: usize,
}

/// The places recovery looks at.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    pub data_dir: &'a Path,
    pub topics_dir: &'a Path,
    pub subscriptions_dir: &'a Path,
}

/// Matches every directory with a definition (see the module docs) and
/// raises the store's id floor past every id seen. `journal` holds the
/// subscription states replayed from the state journal.
///
/// # Errors
/// A storage error if a directory cannot be listed, renamed or synced, or
/// the store cannot be read or written.
pub fn account(
    fs: &dyn Fs,
    meta: &MetaStore,
    layout: Layout<'_>,
    journal: &HashMap<u64, SubscriptionState>,
) -> Result<Accounted> {
    let mut out = Accounted::default();
    for id in journal.keys() {
        meta.raise_id_floor(*id);
    }
    let mut topics = meta.topics()?;
    let found = scan(fs, layout, layout.topics_dir, meta, &mut out)?;
    let known: HashSet<u64> = topics.iter().map(|t| t.id).collect();
    for (id, dir) in &found {
        if known.contains(id) {
            continue;
        }
        match definition::read::<TopicDef>(fs, dir, KIND_TOPIC) {
            Ok(Some(def)) if def.id == *id => match meta.restore_topic(&def) {
                Ok(()) => {
                    tracing::warn!(topic = %def.name, dir = %dir.display(), "restored a topic definition the metadata store had lost, from its directory");
                    out.restored += 1;
                    topics.push(def);
                }
                Err(StorageError::AlreadyExists { .. }) => {
                    set_aside(fs, layout, dir, "another topic has its name", &mut out)?;
                }
                Err(e) => return Err(e.into()),
            },
            Ok(_) => set_aside(fs, layout, dir, "no definition for it", &mut out)?,
            Err(e) => {
                let why = format!("its definition file is unreadable: {e}");
                set_aside(fs, layout, dir, &why, &mut out)?;
            }
        }
    }
    for def in &topics {
        let dir = layout.topics_dir.join(def.id.to_string());
        if found.contains_key(&def.id) {
            refresh_definition(fs, &dir, KIND_TOPIC, def)?;
        } else {
            tracing::error!(topic = %def.name, dir = %dir.display(), "the topic's directory is missing; it starts empty");
        }
    }
    let topic_ids: HashSet<u64> = topics.iter().map(|t| t.id).collect();

    let mut subs = meta.subscriptions()?;
    let found = scan(fs, layout, layout.subscriptions_dir, meta, &mut out)?;
    let known: HashSet<u64> = subs.iter().map(|s| s.id).collect();
    for (id, dir) in &found {
        if known.contains(id) {
            continue;
        }
        match definition::read::<SubscriptionDef>(fs, dir, KIND_SUBSCRIPTION) {
            Ok(Some(def)) if def.id == *id && topic_ids.contains(&def.topic_id) => {
                match meta.restore_subscription(&def) {
                    Ok(()) => {
                        tracing::warn!(subscription = %def.name, dir = %dir.display(), "restored a subscription definition the metadata store had lost, from its directory");
                        out.restored += 1;
                        subs.push(def);
                    }
                    Err(StorageError::AlreadyExists { .. }) => {
                        set_aside(
                            fs,
                            layout,
                            dir,
                            "another subscription has its name",
                            &mut out,
                        )?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Some(_)) => set_aside(fs, layout, dir, "its topic is gone", &mut out)?,
            Ok(None) => set_aside(fs, layout, dir, "no definition for it", &mut out)?,
            Err(e) => {
                let why = format!("its definition file is unreadable: {e}");
                set_aside(fs, layout, dir, &why, &mut out)?;
            }
        }
    }
    let mut kept = Vec::with_capacity(subs.len());
    for def in subs {
        let dir = layout.subscriptions_dir.join(def.id.to_string());
        if !topic_ids.contains(&def.topic_id) {
            // Its dead letters and state are kept: the definition goes with
            // the directory to lost+found, nothing is removed.
            if !fs.exists(&dir) {
                create_dir(fs, layout.subscriptions_dir, &dir)?;
            }
            refresh_definition(fs, &dir, KIND_SUBSCRIPTION, &def)?;
            set_aside(fs, layout, &dir, "its topic is gone", &mut out)?;
            meta.delete_subscription(&def.name)?;
            continue;
        }
        if !found.contains_key(&def.id) {
            // Data directories of earlier versions made one only for dead
            // letters.
            create_dir(fs, layout.subscriptions_dir, &dir)?;
        }
        refresh_definition(fs, &dir, KIND_SUBSCRIPTION, &def)?;
        kept.push(def);
    }
    out.topics = topics;
    out.subscriptions = kept;
    Ok(out)
}

/// Lists `parent`: finishes or undoes deletions in progress, sets stray
/// names aside, and returns the `{id}` directories.
fn scan(
    fs: &dyn Fs,
    layout: Layout<'_>,
    parent: &Path,
    meta: &MetaStore,
    out: &mut Accounted,
) -> Result<HashMap<u64, PathBuf>> {
    let io = |e| StorageError::io(parent, e);
    if !fs.exists(parent) {
        fs.create_dir_all(parent).map_err(io)?;
        fs.sync_dir(layout.data_dir)
            .map_err(|e| StorageError::io(layout.data_dir, e))?;
        return Ok(HashMap::new());
    }
    let defined: HashSet<u64> = meta
        .topics()?
        .iter()
        .map(|t| t.id)
        .chain(meta.subscriptions()?.iter().map(|s| s.id))
        .collect();
    let mut found = HashMap::new();
    for name in fs.list_dir(parent).map_err(io)? {
        let dir = parent.join(&name);
        if let Some(id) = name.strip_suffix(DELETING_SUFFIX).and_then(parse_id) {
            meta.raise_id_floor(id);
            let live = parent.join(id.to_string());
            if defined.contains(&id) && !fs.exists(&live) {
                tracing::warn!(dir = %live.display(), "a deletion that never completed is undone");
                fs.rename(&dir, &live).map_err(io)?;
                fs.sync_dir(parent).map_err(io)?;
                found.insert(id, live);
            } else if let Err(e) = fs.remove_dir_all(&dir) {
                // Accounted for (its deletion was acknowledged); retried at
                // the next start.
                tracing::warn!(dir = %dir.display(), error = %e, "cannot finish removing a deleted directory");
            } else {
                tracing::info!(dir = %dir.display(), "finished removing a deleted directory");
            }
            continue;
        }
        match parse_id(&name) {
            Some(id) => {
                meta.raise_id_floor(id);
                found.insert(id, dir);
            }
            None => set_aside(fs, layout, &dir, "not a directory Courier makes", out)?,
        }
    }
    Ok(found)
}

fn parse_id(name: &str) -> Option<u64> {
    // Only the canonical form: "007" is not the directory of id 7.
    name.parse::<u64>().ok().filter(|id| id.to_string() == name)
}

/// Rewrites `dir`'s definition file if it does not hold `def`.
fn refresh_definition<T>(fs: &dyn Fs, dir: &Path, kind: &str, def: &T) -> Result<()>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq,
{
    let current = definition::read::<T>(fs, dir, kind).ok().flatten();
    if current.as_ref() != Some(def) {
        definition::write(fs, dir, kind, def)?;
    }
    Ok(())
}

/// Creates `dir` under `parent` and makes its entry durable.
pub fn create_dir(fs: &dyn Fs, parent: &Path, dir: &Path) -> Result<()> {
    fs.create_dir_all(dir)
        .map_err(|e| StorageError::io(dir, e))?;
    fs.sync_dir(parent)
        .map_err(|e| StorageError::io(parent, e))?;
    Ok(())
}

/// Moves `dir` to `lost+found/`, with an error log saying why.
fn set_aside(
    fs: &dyn Fs,
    layout: Layout<'_>,
    dir: &Path,
    why: &str,
    out: &mut Accounted,
) -> Result<()> {
    let lost = layout.data_dir.join(DIR_LOST_FOUND);
    if !fs.exists(&lost) {
        create_dir(fs, layout.data_dir, &lost)?;
    }
    let kind = dir
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stamp = crate::broker::subscription::now_us() / 1000;
    let mut target = lost.join(format!("{kind}-{name}-{stamp}"));
    let mut n = 1;
    while fs.exists(&target) {
        target = lost.join(format!("{kind}-{name}-{stamp}-{n}"));
        n += 1;
    }
    fs.rename(dir, &target)
        .map_err(|e| StorageError::io(dir, e))?;
    fs.sync_dir(&lost).map_err(|e| StorageError::io(&lost, e))?;
    if let Some(parent) = dir.parent() {
        fs.sync_dir(parent)
            .map_err(|e| StorageError::io(parent, e))?;
    }
    tracing::error!(dir = %dir.display(), moved_to = %target.display(), reason = why, "data that no definition accounts for was set aside; nothing was deleted");
    out.set_aside += 1;
    Ok(())
}
