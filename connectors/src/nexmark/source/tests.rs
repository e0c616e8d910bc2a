use super::*;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Int32Type, Int64Type};

fn source(partitions: u32, count: u64) -> NexmarkSource {
    NexmarkSource::new(NexmarkConfig {
        partitions,
        count: Some(count),
        rate: None,
        event_rate: Some(1000.0),
        seed: 3,
        start_time: None,
        active_people: 1000,
        in_flight_auctions: 100,
    })
    .unwrap()
}

/// The record columns of every event of a source, partition after partition.
fn events(partitions: u32, count: u64, batch: usize) -> RecordBatch {
    let src = source(partitions, count);
    let mut batches = Vec::new();
    for p in 0..partitions {
        let mut part = src.partition(p);
        loop {
            let env = part.generate(batch).unwrap();
            if env.batch.num_rows() == 0 {
                break;
            }
            batches.push(env.batch.project(&[0, 1, 2, 3, 4]).unwrap());
        }
    }
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

#[test]
fn proportions_ids_and_times_follow_the_reference() {
    let all = events(1, 5000, 1024);
    assert_eq!(all.num_rows(), 5000);
    let kinds = all.column(0).as_primitive::<Int32Type>();
    let count = |k: i32| kinds.values().iter().filter(|v| **v == k).count();
    assert_eq!((count(0), count(1), count(2)), (100, 300, 4600));
    // The first events: ids 2 and 3 are auctions 1001 and 1002, then bids; id 50 is
    // person 1001.
    assert_eq!(&kinds.values()[..4], &[1, 1, 2, 2]);
    assert_eq!(kinds.value(48), 0);
    let person = all.column(1).as_struct();
    assert!(person.is_valid(48) && person.is_null(0));
    let ids = person.column(0).as_primitive::<Int64Type>();
    assert_eq!(ids.value(48), 1001);
    let auction = all.column(2).as_struct();
    let aid = auction.column(0).as_primitive::<Int64Type>();
    assert_eq!((aid.value(0), aid.value(1)), (1001, 1002));
    // 1000 events per second of event time: event number n at start + n ms.
    let t = all
        .column(4)
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    assert_eq!(t.value(0), DEFAULT_START_MS + 1);
    assert_eq!(t.value(4999), DEFAULT_START_MS + 5000);
    let bid = all.column(3).as_struct();
    let bidders = bid.column(1).as_primitive::<Int64Type>();
    let auctions = bid.column(0).as_primitive::<Int64Type>();
    for row in (0..5000).filter(|r| bid.is_valid(*r)) {
        let id = row as i64 + 2;
        assert!(bidders.value(row) >= 1000);
        assert!(bidders.value(row) <= 1000 + model::last_base0_person_id(id) + 10);
        assert!(auctions.value(row) <= 1000 + model::last_base0_auction_id(id) + 10);
    }
}

#[test]
fn events_do_not_depend_on_partitions_or_batches() {
    let whole = events(1, 3000, 3000);
    let split = events(3, 3000, 7);
    assert_eq!(split.num_rows(), 3000);
    // Partition p holds events p, p+3, …: put them back in event order.
    let per = 1000;
    let order: Vec<u32> = (0..3000u32).map(|k| (k % 3) * per + k / 3).collect();
    let indices = arrow::array::UInt32Array::from(order);
    let back = arrow::compute::take_record_batch(&split, &indices).unwrap();
    assert_eq!(whole, back);
    let other_seed = NexmarkSource::new(NexmarkConfig {
        seed: 4,
        ..source(1, 10).config
    })
    .unwrap()
    .partition(0)
    .generate(10)
    .unwrap()
    .batch;
    assert_ne!(whole.slice(0, 10).column(3), &other_seed.column(3).clone());
}

#[test]
fn a_restored_partition_goes_on_with_the_same_events() {
    let mut src = source(2, 1000);
    let whole = src.partition(1).generate(500).unwrap().batch;
    src.restore(Arc::new(Checkpoint {
        id: 1,
        offsets: [("nexmark/1".to_string(), 200)].into(),
        fallback: false,
        positions: Default::default(),
    }));
    let rest = src.partition(1).generate(500).unwrap().batch;
    assert_eq!(rest.num_rows(), 300);
    assert_eq!(whole.slice(200, 300), rest);
}
