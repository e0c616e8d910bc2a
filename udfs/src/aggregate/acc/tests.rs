use super::*;

#[test]
fn merging_in_place_is_merging_a_copy() {
    let pairs = [
        (Acc::Count(7), Acc::Count(5)),
        (Acc::SumInt(None), Acc::SumInt(Some(-3))),
        (Acc::SumInt(Some(4)), Acc::SumInt(None)),
        (Acc::SumFloat(Some(0.1)), Acc::SumFloat(Some(0.2))),
        (Acc::SumFloat(None), Acc::SumFloat(None)),
        (
            Acc::Avg { sum: 3.0, count: 2 },
            Acc::Avg { sum: 1.5, count: 1 },
        ),
        (Acc::Max(Value::Int(3)), Acc::Max(Value::Int(8))),
        (
            Acc::Distinct(Box::new([b"a".to_vec().into()].into())),
            Acc::Distinct(Box::new([b"b".to_vec().into()].into())),
        ),
        (
            Acc::Last(Box::new((Order::MIN, Value::Int(4)))),
            Acc::Last(Box::new((
                Order {
                    time: 5,
                    partition: 1,
                    seq: 9,
                },
                Value::Int(6),
            ))),
        ),
    ];
    for (a, b) in pairs {
        let (mut by_copy, mut in_place) = (a.clone(), a);
        by_copy.merge(b.clone());
        in_place.merge_ref(&b);
        assert_eq!(in_place, by_copy);
    }
}

#[test]
fn every_accumulator_survives_encoding() {
    let mut hll = Hll::default();
    for i in 0..1000u64 {
        hll.add(xxh3_64(&i.to_le_bytes()));
    }
    let accs = vec![
        Acc::Count(7),
        Acc::SumInt(Some(-3)),
        Acc::SumInt(None),
        Acc::SumFloat(Some(2.5)),
        Acc::Min(Value::Text("é".into())),
        Acc::Max(Value::Null),
        Acc::Avg { sum: 3.0, count: 2 },
        Acc::Distinct(Box::new(
            [b"a".to_vec().into(), b"bc".to_vec().into()].into(),
        )),
        Acc::Approx(Box::new(hll)),
        Acc::First(Box::new((
            Order {
                time: 5,
                partition: 1,
                seq: 9,
            },
            Value::Float(1.5),
        ))),
        Acc::Last(Box::new((Order::MIN, Value::Int(4)))),
        Acc::MaxBy(Box::new(Pick {
            by: Value::Int(9),
            at: Order::MIN,
            value: Value::Text("x".into()),
        })),
        Acc::MinBy(Box::default()),
    ];
    // Every key of a window holds one per aggregate: kept small.
    assert!(
        std::mem::size_of::<Acc>() <= 32,
        "{}",
        std::mem::size_of::<Acc>()
    );
    let mut bytes = Vec::new();
    encode(&accs, &mut bytes);
    let (back, rest) = decode(&bytes, accs.len()).unwrap();
    assert!(rest.is_empty());
    assert_eq!(back, accs);
    assert!(decode(&bytes[..bytes.len() - 1], accs.len()).is_err());
}

#[test]
fn hyperloglog_is_within_its_error_and_merges() {
    for n in [10u64, 1_000, 100_000] {
        let (mut a, mut b) = (Hll::default(), Hll::default());
        for i in 0..n {
            let h = xxh3_64(&i.to_le_bytes());
            if i % 2 == 0 { a.add(h) } else { b.add(h) }
        }
        a.merge(&b);
        let error = (a.estimate() - n as f64).abs() / n as f64;
        assert!(error < 0.05, "{n}: estimate {} ({error})", a.estimate());
    }
}
