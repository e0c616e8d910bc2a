//! The store's directory: frozen checkpoints under `checkpoints/<id>`, `LATEST` naming the
//! newest, `FALLBACK` when an older one replaced a damaged one, and the working database
//! rebuilt from them.

use super::*;

/// Rebuilds the working database from the newest readable checkpoint (see [`candidates`]);
/// when that is not the one `LATEST` named, warns and names it in `LATEST`. Returns the
/// database and the id of the checkpoint restored (`None`: nothing was committed yet, and
/// the database starts empty).
pub(super) fn restore(
    dir: &Path,
    working: &Path,
) -> std::result::Result<(rocksdb::DB, Option<u64>), String> {
    let Candidates {
        ids,
        mut unreadable,
    } = candidates(dir).map_err(|e| format!("cannot list the checkpoints: {e}"))?;
    let mut options = db_options();
    if ids.is_empty() && unreadable.is_empty() {
        options.create_if_missing(true);
        let db = rocksdb::DB::open(&options, working).map_err(|e| e.into_string())?;
        return Ok((db, None));
    }
    for id in ids {
        let frozen = checkpoint_path(dir, id);
        let restored = restore_copy(&frozen, working)
            .map_err(|e| e.to_string())
            .and_then(|()| rocksdb::DB::open(&options, working).map_err(|e| e.into_string()))
            .and_then(|db| check_frozen(&db, id).map(|()| db));
        match restored {
            Ok(db) => {
                if !unreadable.is_empty() {
                    tracing::warn!(
                        dir = %dir.display(),
                        unreadable = %unreadable.join("; "),
                        restored = id,
                        "the latest checkpoint cannot be read: restoring an earlier one, whose \
                         records since are read again"
                    );
                    write_id(dir, FALLBACK, id)
                        .map_err(|e| format!("cannot write {FALLBACK}: {e}"))?;
                    write_latest(dir, id).map_err(|e| format!("cannot write {LATEST}: {e}"))?;
                }
                return Ok((db, Some(id)));
            }
            Err(e) => {
                unreadable.push(format!("checkpoint {id} ({}): {e}", frozen.display()));
                if working.exists() {
                    std::fs::remove_dir_all(working)
                        .map_err(|e| format!("cannot clear the working database: {e}"))?;
                }
            }
        }
    }
    Err(format!(
        "no checkpoint can be restored ({}); to start over, give the pipeline a new checkpoint \
         directory",
        unreadable.join("; ")
    ))
}

/// The checkpoints of a store to restore, best first, and what could not be read on the
/// way to them.
#[derive(Default)]
pub(super) struct Candidates {
    pub(super) ids: Vec<u64>,
    pub(super) unreadable: Vec<String>,
}

/// The checkpoint `LATEST` names, then the older ones on disk, newest first. Without
/// `LATEST` nothing was committed. When `LATEST` cannot be read, every checkpoint on disk,
/// but the newest last: it may be one that a crash left before `LATEST` named it (complete,
/// since RocksDB makes it under a staging name, but maybe not synced), whereas the one
/// before it was named.
pub(super) fn candidates(dir: &Path) -> std::io::Result<Candidates> {
    let on_disk = checkpoint_ids(dir)?;
    Ok(match read_latest(dir) {
        Ok(None) => Candidates::default(),
        Ok(Some(latest)) => Candidates {
            ids: std::iter::once(latest)
                .chain(on_disk.into_iter().filter(|id| *id < latest))
                .collect(),
            unreadable: Vec::new(),
        },
        Err(e) => {
            let mut ids = on_disk;
            if !ids.is_empty() {
                ids.rotate_left(1);
            }
            Candidates {
                ids,
                unreadable: vec![e.to_string()],
            }
        }
    })
}

pub(super) fn read_latest(dir: &Path) -> std::io::Result<Option<u64>> {
    match std::fs::read_to_string(dir.join(LATEST)) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            std::io::Error::other(format!("{LATEST} holds `{}`", text.trim().escape_debug()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot read {LATEST}: {e}"),
        )),
    }
}

pub(super) fn checkpoint_path(dir: &Path, id: u64) -> PathBuf {
    dir.join("checkpoints").join(id.to_string())
}

/// The id a directory in `checkpoints/` is named after; `None` for other names (RocksDB's
/// staging directories).
pub(super) fn checkpoint_id(name: &OsStr) -> Option<u64> {
    let name = name.to_str()?;
    let id: u64 = name.parse().ok()?;
    (id.to_string() == name).then_some(id)
}

/// The ids of the checkpoints in `checkpoints/`, newest first.
pub(super) fn checkpoint_ids(dir: &Path) -> std::io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir.join("checkpoints")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut ids = Vec::new();
    for entry in entries {
        ids.extend(checkpoint_id(&entry?.file_name()));
    }
    ids.sort_unstable_by(|a, b| b.cmp(a));
    Ok(ids)
}

/// Whether a database restored from checkpoint `id` holds it: reads its id and offsets, so
/// that a checkpoint that opens but has lost its contents is not taken for this one.
pub(super) fn check_frozen(db: &rocksdb::DB, id: u64) -> std::result::Result<(), String> {
    let held = read_checkpoint(db)?;
    if held.id != id {
        return Err(format!("it holds checkpoint {} instead", held.id));
    }
    Ok(())
}

/// The checkpoint id, the offsets and the positions a database holds.
pub(super) fn read_checkpoint(db: &rocksdb::DB) -> std::result::Result<Checkpoint, String> {
    let mut checkpoint = Checkpoint::default();
    if let Some(id) = db.get(ID_KEY).map_err(|e| e.to_string())? {
        let bytes: [u8; 8] = id
            .as_slice()
            .try_into()
            .map_err(|_| "bad checkpoint id".to_string())?;
        checkpoint.id = u64::from_be_bytes(bytes);
    }
    for (name, value) in prefixed(db, OFFSET_PREFIX)? {
        let offset = decode_offset(&value).ok_or("bad offset value")?;
        checkpoint.offsets.insert(name, offset);
    }
    for (name, value) in prefixed(db, POSITION_PREFIX)? {
        let position = String::from_utf8(value.into_vec()).map_err(|_| "bad position value")?;
        checkpoint.positions.insert(name, position);
    }
    Ok(checkpoint)
}

/// A stored value by the partition name its key ends with.
type Entries = Vec<(String, Box<[u8]>)>;

/// The entries under `prefix`, by the rest of their key (a partition name).
fn prefixed(db: &rocksdb::DB, prefix: &str) -> std::result::Result<Entries, String> {
    let mut out = Vec::new();
    for item in db.prefix_iterator(prefix.as_bytes()) {
        let (key, value) = item.map_err(|e| e.to_string())?;
        let Some(name) = key.strip_prefix(prefix.as_bytes()) else {
            break;
        };
        out.push((String::from_utf8_lossy(name).into_owned(), value));
    }
    Ok(out)
}

/// Syncs a checkpoint's files and its directory, then `checkpoints/`, which holds its
/// entry.
pub(super) fn sync_checkpoint(checkpoint: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(checkpoint)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    std::fs::File::open(checkpoint)?.sync_all()?;
    let parent = checkpoint
        .parent()
        .expect("a checkpoint is in checkpoints/");
    std::fs::File::open(parent)?.sync_all()
}

/// Replaces `LATEST` atomically and durably: write a new file, sync it, rename it over
/// the old one, sync the directory.
pub(super) fn write_latest(dir: &Path, id: u64) -> std::io::Result<()> {
    write_id(dir, LATEST, id)
}

/// Replaces the file `name` in `dir` with `id`, atomically and durably.
pub(super) fn write_id(dir: &Path, name: &str, id: u64) -> std::io::Result<()> {
    use std::io::Write;
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temp)?;
    writeln!(file, "{id}")?;
    file.sync_all()?;
    std::fs::rename(&temp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The checkpoint id a marker file names; `None` when it is missing or not an id.
pub(super) fn read_id(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Names the checkpoint restored in place of a lost one, until the next commit.
pub(super) const FALLBACK: &str = "FALLBACK";

/// A working copy of a frozen checkpoint: table files are immutable, so they are hard
/// linked; the small files are copied.
pub(super) fn restore_copy(frozen: &Path, working: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(working)?;
    for entry in std::fs::read_dir(frozen)? {
        let entry = entry?;
        let name = entry.file_name();
        let (from, to) = (entry.path(), working.join(&name));
        let is_table = name.to_string_lossy().ends_with(".sst");
        if !is_table || std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

/// Removes from `checkpoints/` everything but checkpoint `keep` and the newest one before
/// it (the fallback while `keep` is the latest): older checkpoints, those a crash left half
/// made, and unreadable ones that opening fell back from.
pub(super) fn remove_checkpoints_except(dir: &Path, keep: Option<u64>) {
    let Ok(entries) = std::fs::read_dir(dir.join("checkpoints")) else {
        return;
    };
    let previous = keep.and_then(|keep| {
        let on_disk = checkpoint_ids(dir).ok()?;
        on_disk.into_iter().find(|id| *id < keep)
    });
    for entry in entries.flatten() {
        let id = checkpoint_id(&entry.file_name());
        if id.is_some() && (id == keep || id == previous) {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an old checkpoint");
        }
    }
}
