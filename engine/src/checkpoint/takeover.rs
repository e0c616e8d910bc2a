//! Taking a partition's state over from another member sharing the checkpoint directory:
//! a hard-linked copy of its last checkpoint, and the partition's keys copied out of it.

use super::*;

/// A read-only copy of a member's last checkpoint: its files hard linked into a temporary
/// directory, so that the member may go on (and delete the checkpoint) while it is read.
///
/// The member is not stopped meanwhile: it may take checkpoints and remove old ones during
/// the copy, and a copy that caught a removal half way fails in any of its steps (a file
/// gone, a listing that missed one, a copy that does not open). A failure while the
/// member's `LATEST` or `checkpoints/` changed is such a race, and the copy starts again
/// from what the member holds now; a failure while nothing changed is a damaged
/// checkpoint, and the copy falls back to the one before it, as opening the store does.
///
/// The temporary directory (`.takeover-*` in the shared directory) holds a `LOCK` file,
/// locked for as long as the copy is in use: see [`remove_takeover_leftovers`].
pub(super) struct FrozenCopy {
    pub(super) db: rocksdb::DB,
    /// Removed after the database has closed, and before the lock goes.
    pub(super) _dir: tempfile::TempDir,
    pub(super) _lock: std::fs::File,
}

/// Why a copy of a member's checkpoint failed.
pub(super) enum CopyFailure {
    /// Its own directory vanished under it (taken for a leftover): copy again.
    Raced,
    /// The checkpoint could not be read, or the member changed it during the copy.
    Unreadable(String),
    /// This process cannot make a copy at all.
    Io(std::io::Error),
}

impl FrozenCopy {
    pub(super) fn open(root: &Path, member: &Path) -> std::io::Result<Option<FrozenCopy>> {
        for _ in 0..COPY_ATTEMPTS {
            let before = listing(member);
            let Candidates {
                ids,
                mut unreadable,
            } = candidates(member)?;
            if ids.is_empty() && unreadable.is_empty() {
                return Ok(None);
            }
            let mut raced = false;
            for id in ids {
                match Self::copy(root, member, id) {
                    Ok(copy) => {
                        if !unreadable.is_empty() {
                            tracing::warn!(
                                member = %member.display(),
                                unreadable = %unreadable.join("; "),
                                using = id,
                                "a member's latest checkpoint cannot be read: taking over from \
                                 an earlier one"
                            );
                        }
                        return Ok(Some(copy));
                    }
                    Err(CopyFailure::Unreadable(e)) if listing(member) == before => {
                        unreadable.push(format!("checkpoint {id}: {e}"));
                    }
                    Err(CopyFailure::Io(e)) => return Err(e),
                    Err(CopyFailure::Raced | CopyFailure::Unreadable(_)) => {
                        raced = true;
                        break;
                    }
                }
            }
            if !raced {
                return Err(std::io::Error::other(format!(
                    "no checkpoint of {} can be read: {}",
                    member.display(),
                    unreadable.join("; ")
                )));
            }
        }
        Err(std::io::Error::other(format!(
            "{} changed its checkpoints {COPY_ATTEMPTS} times while they were copied",
            member.display()
        )))
    }

    /// Copies checkpoint `id` of `member` into a new directory under `root`, and opens it.
    pub(super) fn copy(
        root: &Path,
        member: &Path,
        id: u64,
    ) -> std::result::Result<FrozenCopy, CopyFailure> {
        let dir = tempfile::Builder::new()
            .prefix(TAKEOVER_PREFIX)
            .tempdir_in(root)
            .map_err(CopyFailure::Io)?;
        let lock_path = dir.path().join("LOCK");
        let lock = match std::fs::File::create(&lock_path) {
            Ok(lock) => lock,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CopyFailure::Raced),
            Err(e) => return Err(CopyFailure::Io(e)),
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(CopyFailure::Raced),
            Err(std::fs::TryLockError::Error(e)) => return Err(CopyFailure::Io(e)),
        }
        // A clean-up that locked the file first has removed the directory, or is removing it.
        if !lock_path.exists() {
            return Err(CopyFailure::Raced);
        }
        let copy = dir.path().join("db");
        let opened = restore_copy(&checkpoint_path(member, id), &copy)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                #[cfg(test)]
                tests::after_copy(&copy);
                rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), &copy, false)
                    .map_err(|e| e.into_string())
            })
            .and_then(|db| check_frozen(&db, id).map(|()| db));
        match opened {
            Ok(db) => Ok(FrozenCopy {
                db,
                _dir: dir,
                _lock: lock,
            }),
            Err(e) => Err(CopyFailure::Unreadable(e)),
        }
    }
}

/// What a member's checkpoints look like from outside: `LATEST` and the names in
/// `checkpoints/`. A copy that failed while this changed raced the member.
pub(super) fn listing(dir: &Path) -> (Option<String>, Vec<std::ffi::OsString>) {
    let latest = std::fs::read_to_string(dir.join(LATEST)).ok();
    let mut names: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    (latest, names)
}

/// Removes the `.takeover-*` directories in a shared directory that take-overs left when
/// their process died (kill -9): their hard links would keep old table files alive forever.
///
/// Another process may be taking over from the same directory at this moment. A take-over
/// holds the lock on its directory's `LOCK` file for as long as it uses the directory, and
/// the kernel releases the lock when the process ends, however it ends: a directory whose
/// lock can be taken is a leftover. A process id in the name would not do: after a restart
/// (a container's, above all) the same id often belongs to the new process, and a
/// leftover would look in use forever. The lock is held here while the directory is
/// removed, so a take-over that made its `LOCK` file but had not locked it yet cannot use
/// the directory: it finds the lock taken or the file gone, and starts again elsewhere. A
/// directory without a `LOCK` file is a take-over in its first instant (or one killed in
/// that instant): it is removed only once it is [`UNLOCKED_TAKEOVER_AGE`] old.
pub(super) fn remove_takeover_leftovers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let named = entry
            .file_name()
            .to_string_lossy()
            .starts_with(TAKEOVER_PREFIX);
        if !named || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        let _held = match std::fs::File::open(path.join("LOCK")) {
            Ok(lock) => match lock.try_lock() {
                Ok(()) => Some(lock),
                // In use by a live take-over.
                Err(_) => continue,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let modified = entry.metadata().and_then(|m| m.modified());
                let age = modified.ok().and_then(|t| t.elapsed().ok());
                // An unknown age counts as young: kept.
                if age.is_none_or(|age| age < UNLOCKED_TAKEOVER_AGE) {
                    continue;
                }
                None
            }
            Err(_) => continue,
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed a killed take-over's copy"),
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot remove a killed take-over's copy"
            ),
        }
    }
}

/// Replaces, in `batch` for database `own`, the partition's state with what `from` holds.
pub(super) fn copy_partition(
    own: &rocksdb::DB,
    from: &rocksdb::DB,
    name: &str,
    keys: &PartitionKeys,
    offset: i64,
    batch: &mut rocksdb::WriteBatch,
) -> std::result::Result<(), rocksdb::Error> {
    for prefix in &keys.prefixes {
        for item in own.iterator(rocksdb::IteratorMode::From(
            prefix,
            rocksdb::Direction::Forward,
        )) {
            let (key, _) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            batch.delete(&key);
        }
        for item in from.iterator(rocksdb::IteratorMode::From(
            prefix,
            rocksdb::Direction::Forward,
        )) {
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            batch.put(&key, &value);
        }
    }
    for key in &keys.keys {
        match from.get(key)? {
            Some(value) => batch.put(key, value),
            None => batch.delete(key),
        }
    }
    batch.put(offset_key(name), offset.to_be_bytes());
    match from.get(position_key(name))? {
        Some(position) => batch.put(position_key(name), position),
        None => batch.delete(position_key(name)),
    }
    Ok(())
}
