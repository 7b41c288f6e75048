//! The state journal: replay, compaction by snapshots, power loss.

use std::path::Path;
use std::sync::Arc;

use courier::storage::io::{Fs, SimFs};
use courier::storage::state::{StateEntry, StateJournal, SubscriptionState};
use courier::storage::{LogConfig, Offset};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        ..LogConfig::default()
    }
}

fn open(
    fs: &SimFs,
) -> (
    StateJournal,
    std::collections::HashMap<u64, SubscriptionState>,
) {
    StateJournal::open(
        Arc::new(fs.clone()) as Arc<dyn Fs>,
        Path::new("/data/state"),
        config(),
    )
    .unwrap()
}

/// Applies entries to the in-memory model and journals them, as the broker does.
async fn journal(
    j: &StateJournal,
    model: &mut SubscriptionState,
    sub: u64,
    entries: Vec<StateEntry>,
) {
    for e in &entries {
        model.apply(e);
    }
    j.enqueue(sub, &entries).unwrap().wait().await.unwrap();
}

#[tokio::test]
async fn replay_after_power_loss_rebuilds_every_completed_change() {
    let fs = SimFs::new();
    let mut a = SubscriptionState::starting_at(Offset(0));
    let mut b = SubscriptionState::starting_at(Offset(10));
    {
        let (j, states) = open(&fs);
        assert!(states.is_empty());
        journal(&j, &mut b, 2, vec![StateEntry::Floor { floor: 10 }]).await;
        for i in 0..200u64 {
            journal(
                &j,
                &mut a,
                1,
                vec![StateEntry::Delivered {
                    offset: i,
                    count: 1,
                    time_us: i,
                }],
            )
            .await;
            if i % 3 != 0 {
                journal(
                    &j,
                    &mut a,
                    1,
                    vec![StateEntry::Settled {
                        ranges: vec![(i, i + 1)],
                    }],
                )
                .await;
            }
            journal(
                &j,
                &mut b,
                2,
                vec![StateEntry::Settled {
                    ranges: vec![(10 + i, 11 + i)],
                }],
            )
            .await;
        }
        let mut c = SubscriptionState::default();
        journal(
            &j,
            &mut c,
            3,
            vec![StateEntry::Floor { floor: 5 }, StateEntry::Dropped],
        )
        .await;
        fs.power_loss();
    }
    let (_j, states) = open(&fs);
    assert_eq!(states.get(&1), Some(&a));
    assert_eq!(states.get(&2), Some(&b));
    assert!(
        !states.contains_key(&3),
        "a dropped subscription stays dropped"
    );
    assert_eq!(b.settled.floor(), 210);
    assert_eq!(a.attempts.len(), 67);
}

#[tokio::test]
async fn compaction_keeps_the_state_and_frees_the_old_segments() {
    let fs = SimFs::new();
    let mut a = SubscriptionState::starting_at(Offset(0));
    let (j, _) = open(&fs);
    for i in 0..500u64 {
        journal(
            &j,
            &mut a,
            1,
            vec![StateEntry::Delivered {
                offset: i,
                count: 2,
                time_us: i,
            }],
        )
        .await;
        journal(
            &j,
            &mut a,
            1,
            vec![StateEntry::Settled {
                ranges: vec![(i, i + 1)],
            }],
        )
        .await;
    }
    let before = j.disk_bytes();
    // The broker's compaction: roll, snapshot every subscription, truncate.
    j.request_roll();
    let appended = j
        .enqueue(1, &[StateEntry::Snapshot(Box::new(a.clone()))])
        .unwrap()
        .wait()
        .await
        .unwrap();
    j.truncate_before(appended.base_offset).unwrap();
    // Changes after the snapshot still apply on top of it.
    journal(
        &j,
        &mut a,
        1,
        vec![StateEntry::Delivered {
            offset: 500,
            count: 1,
            time_us: 9,
        }],
    )
    .await;
    let after = j.disk_bytes();
    assert!(
        after < before / 4,
        "journal did not shrink: {before} -> {after}"
    );
    j.close();
    drop(j);
    let (_j, states) = open(&fs);
    assert_eq!(states.get(&1), Some(&a));
    assert_eq!(a.settled.floor(), 500);
}
