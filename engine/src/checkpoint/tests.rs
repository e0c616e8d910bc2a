//! Tests of the checkpoint stores: one contract for every store, and the RocksDB store's
//! restarts, fallbacks and take-overs.

use super::*;

/// The same body for every store.
fn store_contract(open: &dyn Fn() -> Box<dyn CheckpointStore>) {
    let store = open();
    assert_eq!(store.load().unwrap(), Checkpoint::default());
    let first = Checkpoint {
        id: 1,
        offsets: [("a.jsonl".to_string(), 10), ("generator/0".to_string(), 5)].into(),
        fallback: false,
        positions: [(
            "s/shardId-000000000001".to_string(),
            "7 4968088105".to_string(),
        )]
        .into(),
    };
    store.commit(&first).unwrap();
    assert_eq!(store.load().unwrap(), first);
    // A later checkpoint replaces what it names and keeps the rest.
    store
        .commit(&Checkpoint {
            id: 2,
            offsets: [("a.jsonl".to_string(), 20)].into(),
            fallback: false,
            positions: Default::default(),
        })
        .unwrap();
    let now = store.load().unwrap();
    assert_eq!(now.id, 2);
    assert_eq!(now.start_of("a.jsonl"), 20);
    assert_eq!(now.start_of("generator/0"), 5);
    assert_eq!(now.start_of("unknown"), 0);
    // A position stays until a checkpoint gives the partition another.
    assert_eq!(now.positions, first.positions);
    let third = Checkpoint {
        id: 3,
        positions: [(
            "s/shardId-000000000001".to_string(),
            "9 4968088106".to_string(),
        )]
        .into(),
        ..Checkpoint::default()
    };
    store.commit(&third).unwrap();
    assert_eq!(store.load().unwrap().positions, third.positions);
}

#[test]
fn memory_store() {
    let store = std::sync::Arc::new(MemoryStore::default());
    // One shared instance: "reopening" a memory store is looking at it again.
    struct Shared(std::sync::Arc<MemoryStore>);
    impl CheckpointStore for Shared {
        fn load(&self) -> Result<Checkpoint> {
            self.0.load()
        }
        fn commit(&self, c: &Checkpoint) -> Result<()> {
            self.0.commit(c)
        }
    }
    store_contract(&|| Box::new(Shared(store.clone())));
}

#[test]
fn rocks_store_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    store_contract(&|| Box::new(RocksStore::open(dir.path()).unwrap()));
    // Reopened after the contract ran: the last checkpoint is still there.

    let reopened = RocksStore::open(dir.path()).unwrap();
    let last = reopened.load().unwrap();
    assert_eq!(last.id, 3);
    assert_eq!(last.positions["s/shardId-000000000001"], "9 4968088106");
}

#[test]
fn state_written_after_the_last_checkpoint_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RocksStore::open(dir.path()).unwrap();
        let db = store.db().unwrap();
        db.put_opt(b"state/a", b"1", &unlogged()).unwrap();
        store
            .commit(&Checkpoint {
                id: 1,
                offsets: [("p".to_string(), 10)].into(),
                fallback: false,
                positions: Default::default(),
            })
            .unwrap();
        // Written after the checkpoint, then the process "crashes" (no commit).
        db.put_opt(b"state/a", b"2", &unlogged()).unwrap();
        db.put_opt(b"state/b", b"3", &unlogged()).unwrap();
        db.put(b"offset/p", 99i64.to_be_bytes()).unwrap();
    }
    // A half-made checkpoint directory of the next id, as a crash mid-checkpoint leaves.
    std::fs::create_dir_all(dir.path().join("checkpoints/2")).unwrap();
    let store = RocksStore::open(dir.path()).unwrap();
    let db = store.db().unwrap();
    assert_eq!(db.get(b"state/a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(db.get(b"state/b").unwrap(), None);
    assert_eq!(store.load().unwrap().start_of("p"), 10);
    assert!(!dir.path().join("checkpoints/2").exists());
    // The next checkpoint reuses the id the crash left half made.
    store
        .commit(&Checkpoint {
            id: 2,
            offsets: [("p".to_string(), 20)].into(),
            fallback: false,
            positions: Default::default(),
        })
        .unwrap();
    drop((db, store));
    assert_eq!(
        RocksStore::open(dir.path())
            .unwrap()
            .load()
            .unwrap()
            .start_of("p"),
        20
    );
}

#[test]
fn a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = RocksStore::open(dir.path()).unwrap();
    let e = RocksStore::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("another process"), "{e}");
    drop(first);
    assert!(RocksStore::open(dir.path()).is_ok());
}

#[test]
fn a_bare_database_of_the_old_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(rocksdb::DB::open_default(dir.path()).unwrap());
    let e = RocksStore::open(dir.path()).err().unwrap().to_string();
    assert!(e.contains("earlier Sluice"), "{e}");
}

/// A member writing state for a partition (keys under `s/NAME/`) and committing it.
fn commit_state(store: &RocksStore, id: u64, name: &str, offset: i64, values: &[(&str, &str)]) {
    let db = store.db().unwrap();
    for (k, v) in values {
        db.put(format!("s/{name}/{k}"), v).unwrap();
    }
    db.put(format!("m/{name}"), format!("meta@{offset}"))
        .unwrap();
    store
        .commit(&Checkpoint {
            id,
            offsets: [(name.to_string(), offset)].into(),
            fallback: false,
            positions: Default::default(),
        })
        .unwrap();
}

fn keys(name: &str) -> PartitionKeys {
    PartitionKeys {
        prefixes: vec![format!("s/{name}/").into_bytes()],
        keys: vec![format!("m/{name}").into_bytes()],
    }
}

fn state_of(store: &RocksStore, name: &str) -> Vec<(String, String)> {
    let db = store.db().unwrap();
    let prefix = format!("s/{name}/");
    let mut out: Vec<(String, String)> = db
        .prefix_iterator(prefix.as_bytes())
        .map(|i| i.unwrap())
        .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
        .map(|(k, v)| {
            (
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect();
    if let Some(m) = db.get(format!("m/{name}")).unwrap() {
        out.push(("meta".into(), String::from_utf8(m).unwrap()));
    }
    out
}

#[test]
fn a_member_takes_over_the_newest_state_of_a_partition() {
    let root = tempfile::tempdir().unwrap();
    let a = RocksStore::open_member(root.path(), "a").unwrap();
    let b = RocksStore::open_member(root.path(), "b").unwrap();
    let c = RocksStore::open_member(root.path(), "c").unwrap();
    // p1: a had it up to 100, then c up to 250 (newest). p2: only b, at 40.
    commit_state(&a, 1, "p1", 100, &[("x", "1"), ("y", "1")]);
    commit_state(&c, 1, "p1", 250, &[("x", "5")]);
    commit_state(&b, 1, "p2", 40, &[("z", "9")]);
    // b's own older copy of p1 (it had p1 once, at 50): replaced, key by key.
    commit_state(&b, 2, "p1", 50, &[("old", "0")]);
    let taken = b
        .take_over(&[("p1".into(), keys("p1")), ("p2".into(), keys("p2"))])
        .unwrap();
    assert_eq!(
        taken,
        [("p1".to_string(), 250)].into(),
        "p2 is b's own newest"
    );
    assert_eq!(
        state_of(&b, "p1"),
        vec![
            ("s/p1/x".into(), "5".into()),
            ("meta".into(), "meta@250".into())
        ]
    );
    assert_eq!(
        state_of(&b, "p2"),
        vec![
            ("s/p2/z".into(), "9".into()),
            ("meta".into(), "meta@40".into())
        ]
    );
    assert_eq!(b.load().unwrap().start_of("p1"), 250);
    // Taking over again finds nothing newer.
    assert!(
        b.take_over(&[("p1".into(), keys("p1"))])
            .unwrap()
            .is_empty()
    );
    // A store that is no member takes nothing over.
    let single = tempfile::tempdir().unwrap();
    let alone = RocksStore::open(single.path()).unwrap();
    assert!(
        alone
            .take_over(&[("p1".into(), keys("p1"))])
            .unwrap()
            .is_empty()
    );
    // A shared directory is not opened as a single process's.
    let e = RocksStore::open(root.path()).err().unwrap().to_string();
    assert!(e.contains("shared by worker processes"), "{e}");
}

#[test]
fn a_member_takes_over_from_the_directorys_earlier_single_process_store() {
    let root = tempfile::tempdir().unwrap();
    {
        let single = RocksStore::open(root.path()).unwrap();
        commit_state(&single, 1, "p1", 70, &[("x", "7")]);
    }
    let a = RocksStore::open_member(root.path(), "a").unwrap();
    assert_eq!(
        a.take_over(&[("p1".into(), keys("p1"))]).unwrap(),
        [("p1".to_string(), 70)].into()
    );
    assert_eq!(state_of(&a, "p1")[0], ("s/p1/x".into(), "7".into()));
    assert!(RocksStore::open_member(root.path(), "../x").is_err());
}

/// A way the newest checkpoint of the store in a directory is lost, and its name.
type Damage = (&'static str, fn(&Path));

fn damages() -> [Damage; 3] {
    [
        ("the newest checkpoint deleted", |dir| {
            std::fs::remove_dir_all(dir.join("checkpoints/2")).unwrap()
        }),
        ("the newest checkpoint corrupt", |dir| {
            corrupt(&dir.join("checkpoints/2"))
        }),
        ("LATEST holding garbage", |dir| {
            std::fs::write(dir.join(LATEST), "\u{0}garbage").unwrap()
        }),
    ]
}

/// Replaces every file of a checkpoint with garbage. Its table files are hard links
/// shared with the checkpoint before it: each is unlinked first, so that only this
/// checkpoint is damaged.
fn corrupt(checkpoint: &Path) {
    for entry in std::fs::read_dir(checkpoint).unwrap() {
        let path = entry.unwrap().path();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"not a checkpoint").unwrap();
    }
}

fn checkpoints_on_disk(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn the_previous_checkpoint_is_kept_until_the_next_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path()).unwrap();
    let commit = |id: u64| {
        store
            .commit(&Checkpoint {
                id,
                offsets: [("p".to_string(), id as i64 * 10)].into(),
                fallback: false,
                positions: Default::default(),
            })
            .unwrap()
    };
    commit(1);
    assert_eq!(checkpoints_on_disk(dir.path()), ["1"]);
    commit(2);
    assert_eq!(checkpoints_on_disk(dir.path()), ["1", "2"]);
    commit(3);
    assert_eq!(checkpoints_on_disk(dir.path()), ["2", "3"]);
    drop(store);
    // Opening keeps the fallback too.
    drop(RocksStore::open(dir.path()).unwrap());
    assert_eq!(checkpoints_on_disk(dir.path()), ["2", "3"]);
}

#[test]
fn opening_falls_back_to_the_previous_checkpoint_when_the_latest_is_lost() {
    for (damage, apply) in damages() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RocksStore::open(dir.path()).unwrap();
            commit_state(&store, 1, "p", 10, &[("x", "1")]);
            commit_state(&store, 2, "p", 20, &[("x", "2"), ("y", "2")]);
        }
        apply(dir.path());
        let store = RocksStore::open(dir.path()).unwrap_or_else(|e| panic!("{damage}: {e}"));
        let restored = store.load().unwrap();
        assert_eq!((restored.id, restored.start_of("p")), (1, 10), "{damage}");
        // Sources start at these offsets, not at a group's the lost checkpoint moved on;
        // also after a restart before the next commit.
        assert!(restored.fallback, "{damage}");
        drop(store);
        let store = RocksStore::open(dir.path()).unwrap();
        assert!(store.load().unwrap().fallback, "{damage}: after a restart");
        assert_eq!(
            state_of(&store, "p"),
            vec![
                ("s/p/x".into(), "1".into()),
                ("meta".into(), "meta@10".into())
            ],
            "{damage}"
        );
        // The store goes on from there: the next checkpoint takes the lost one's id.
        commit_state(&store, 2, "p", 30, &[]);
        assert!(!store.load().unwrap().fallback, "{damage}: committed since");
        drop(store);
        let reopened = RocksStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load().unwrap().start_of("p"), 30, "{damage}");
        assert!(!reopened.load().unwrap().fallback, "{damage}");
    }
}

#[test]
fn a_take_over_falls_back_when_a_members_latest_checkpoint_is_lost() {
    for (damage, apply) in damages() {
        let root = tempfile::tempdir().unwrap();
        let a = RocksStore::open_member(root.path(), "a").unwrap();
        let b = RocksStore::open_member(root.path(), "b").unwrap();
        commit_state(&b, 1, "p1", 40, &[("x", "4")]);
        commit_state(&b, 2, "p1", 50, &[("x", "5")]);
        apply(&root.path().join(MEMBERS).join("b"));
        let taken = a
            .take_over(&[("p1".into(), keys("p1"))])
            .unwrap_or_else(|e| panic!("{damage}: {e}"));
        assert_eq!(taken, [("p1".to_string(), 40)].into(), "{damage}");
        assert_eq!(
            state_of(&a, "p1")[0],
            ("s/p1/x".into(), "4".into()),
            "{damage}"
        );
    }
}

#[test]
fn leftover_take_over_directories_are_removed_at_open() {
    let root = tempfile::tempdir().unwrap();
    let make = |name: &str, lock: bool| {
        let dir = root.path().join(name);
        std::fs::create_dir_all(dir.join("db")).unwrap();
        std::fs::write(dir.join("db/000009.sst"), b"a table kept alive").unwrap();
        if lock {
            std::fs::write(dir.join("LOCK"), b"").unwrap();
        }
        dir
    };
    // Killed mid take-over: the lock died with the process.
    let killed = make(".takeover-killed", true);
    // Killed in the instant between making the directory and its lock file.
    let unlocked = make(".takeover-unlocked", false);
    std::fs::File::open(&unlocked)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    // Another process's take-over, going on now (and one in that first instant).
    let live = make(".takeover-live", true);
    let held = std::fs::File::open(live.join("LOCK")).unwrap();
    held.try_lock().unwrap();
    let starting = make(".takeover-starting", false);
    let _a = RocksStore::open_member(root.path(), "a").unwrap();
    assert!(!killed.exists());
    assert!(!unlocked.exists());
    assert!(live.join("db/000009.sst").exists());
    assert!(starting.join("db/000009.sst").exists());
}

/// What a test plays between a take-over's copy and its opening.
type AfterCopy = Box<dyn FnMut(&Path)>;

thread_local! {
    static AFTER_COPY: std::cell::RefCell<Option<AfterCopy>> =
        const { std::cell::RefCell::new(None) };
}

/// Called by a take-over between copying a member's checkpoint and opening the copy:
/// a test plays there what another process does meanwhile.
pub(super) fn after_copy(copy: &Path) {
    AFTER_COPY.with_borrow_mut(|hook| {
        if let Some(hook) = hook {
            hook(copy)
        }
    });
}

#[test]
fn a_take_over_copies_again_when_the_checkpoint_it_copied_is_removed() {
    let root = tempfile::tempdir().unwrap();
    let a = RocksStore::open_member(root.path(), "a").unwrap();
    let b = RocksStore::open_member(root.path(), "b").unwrap();
    commit_state(&b, 1, "p1", 40, &[("x", "4")]);
    let mut b = Some(b);
    AFTER_COPY.set(Some(Box::new(move |copy: &Path| {
        // While the first copy is made, b moves on, and its clean-up removes the
        // checkpoint being copied; a listing taken during the removal misses files
        // (here CURRENT), and the copy cannot be opened.
        if let Some(b) = b.take() {
            commit_state(&b, 2, "p1", 50, &[("x", "5")]);
            commit_state(&b, 3, "p1", 60, &[("x", "6")]);
            std::fs::remove_file(copy.join("CURRENT")).unwrap();
        }
    })));
    let taken = a.take_over(&[("p1".into(), keys("p1"))]);
    AFTER_COPY.set(None);
    assert_eq!(taken.unwrap(), [("p1".to_string(), 60)].into());
    assert_eq!(state_of(&a, "p1")[0], ("s/p1/x".into(), "6".into()));
}
