use super::*;
use arrow::array::{Float32Builder, ListBuilder};
use arrow::datatypes::Schema;

fn random_model(
    rng: &mut fastrand::Rng,
    titles: usize,
    f: usize,
    k: usize,
) -> (Model, Vec<f32>, Vec<Vec<f32>>) {
    let weights: Vec<f32> = (0..f).map(|_| rng.f32() * 2.0 - 0.5).collect();
    let vectors: Vec<Vec<f32>> = (0..titles)
        .map(|_| (0..f).map(|_| rng.f32() * 2.0 - 1.0).collect())
        .collect();
    let content = vectors
        .iter()
        .enumerate()
        .map(|(j, v)| ContentEntry {
            id: 1000 + j as i64,
            vector: v.clone(),
            popularity: rng.f32(),
        })
        .collect();
    (
        Model::new(weights.clone(), content, k).unwrap(),
        weights,
        vectors,
    )
}

/// The definition, computed the slow way: every score in f64, sorted.
fn naive(user: &[f32], weights: &[f32], vectors: &[Vec<f32>], k: usize) -> Vec<(usize, f64)> {
    let mut all: Vec<(usize, f64)> = vectors
        .iter()
        .enumerate()
        .map(|(j, v)| {
            (
                j,
                (0..user.len())
                    .map(|i| weights[i] as f64 * user[i] as f64 * v[i] as f64)
                    .sum(),
            )
        })
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

#[test]
fn top_k_equals_a_naive_ranking_on_random_data() {
    let mut rng = fastrand::Rng::with_seed(7);
    for case in 0..200 {
        let (titles, f, k) = (rng.usize(1..400), rng.usize(1..40), rng.usize(1..20));
        let (model, weights, vectors) = random_model(&mut rng, titles, f, k);
        let user: Vec<f32> = (0..f).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let mut scores = vec![0.0; model.padded()];
        model.score_all(&user, &mut scores);
        let scores = &scores[..titles];
        let (mut ids, mut best) = (vec![0u32; model.k], vec![0f32; model.k]);
        top_k(scores, &mut ids, &mut best);
        let want = naive(&user, &weights, &vectors, k);
        assert_eq!(ids.len(), want.len(), "case {case}");
        for (i, (&got, &(want_id, want_score))) in ids.iter().zip(&want).enumerate() {
            assert!(
                (best[i] as f64 - want_score).abs() < 1e-4,
                "case {case} rank {i}: {} vs {want_score}",
                best[i]
            );
            // Ids may differ only where two titles score the same within rounding.
            if got as usize != want_id {
                let theirs = naive(&user, &weights, &vectors, titles)
                    .into_iter()
                    .find(|(j, _)| *j == got as usize)
                    .unwrap()
                    .1;
                assert!(
                    (theirs - want_score).abs() < 1e-4,
                    "case {case} rank {i}: got title {got}, want {want_id}"
                );
            }
        }
    }
}

#[test]
fn top_k_prefers_lower_indices_on_ties_and_skips_nan() {
    let (mut ids, mut best) = (vec![0u32; 3], vec![0f32; 3]);
    top_k(&[1.0, f32::NAN, 2.0, 2.0, 1.0, 3.0], &mut ids, &mut best);
    assert_eq!(ids, [5, 2, 3]);
    assert_eq!(best, [3.0, 2.0, 2.0]);
}

#[test]
fn top_k_with_ties_and_nans_in_every_block_equals_a_sort() {
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..300 {
        let n = rng.usize(1..200);
        // Few distinct values: many ties; some NaN.
        let scores: Vec<f32> = (0..n)
            .map(|_| {
                if rng.u8(..) < 20 {
                    f32::NAN
                } else {
                    rng.u8(..8) as f32
                }
            })
            .collect();
        let k = rng.usize(1..20);
        let mut want: Vec<usize> = (0..n).filter(|&i| !scores[i].is_nan()).collect();
        want.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        want.truncate(k);
        let (mut ids, mut best) = (vec![0u32; k], vec![0f32; k]);
        let chosen = top_k(&scores, &mut ids, &mut best);
        assert_eq!(chosen, want.len());
        let got: Vec<usize> = ids[..chosen].iter().map(|&i| i as usize).collect();
        assert_eq!(got, want, "{scores:?}");
    }
}

fn events(users: &[i64], vectors: &[Option<Vec<f32>>]) -> RecordBatch {
    let mut lists = ListBuilder::new(Float32Builder::new());
    for v in vectors {
        match v {
            Some(v) => {
                lists.values().append_slice(v);
                lists.append(true);
            }
            None => lists.append(false),
        }
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("features", list_of(DataType::Float32), true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(users.to_vec())),
            Arc::new(lists.finish()),
        ],
    )
    .unwrap()
}

fn stage(model: Model, input: &SchemaRef) -> (Box<dyn Stage>, SchemaRef) {
    let output = extend_schema(
        input,
        &[
            ("recs", list_of(DataType::Int64)),
            ("recs_scores", list_of(DataType::Float32)),
            ("recs_source", DataType::Utf8),
        ],
    )
    .unwrap();
    let factory = ScoreFactory {
        model: Arc::new(model),
        user: "user_id".into(),
        features: "features".into(),
        cache: CacheConfig::default(),
        output: output.clone(),
    };
    (factory.create().unwrap(), output)
}

#[tokio::test]
async fn rows_say_whether_they_were_generated_cached_or_fallback() {
    let mut rng = fastrand::Rng::with_seed(3);
    let (model, weights, vectors) = random_model(&mut rng, 50, 4, 3);
    let popular = model.popular.clone();
    let alice = vec![0.5, -0.25, 1.0, 0.75];
    let batch = events(
        &[1, 2, 1, 3],
        &[
            Some(alice.clone()),
            None,
            Some(alice.clone()),
            Some(vec![1.0, 2.0]),
        ],
    );
    let (mut stage, _) = stage(model, &batch.schema());
    let ctx = StageContext::detached("recommend");
    let out = stage.process_batch(batch, &ctx).await.unwrap();
    // The row with 2 features for a 4-feature model fails on its own.
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].row, 3);
    assert!(
        out.failed[0].reason.contains("2 values; the model has 4"),
        "{}",
        out.failed[0].reason
    );
    let b = out.batch;
    assert_eq!(b.num_rows(), 3);
    let source = b.column_by_name("recs_source").unwrap().as_string::<i32>();
    assert_eq!(
        source.iter().flatten().collect::<Vec<_>>(),
        ["generated", "fallback", "cache"]
    );
    let recs = b.column_by_name("recs").unwrap().as_list::<i32>();
    let want: Vec<i64> = naive(&alice, &weights, &vectors, 3)
        .iter()
        .map(|(j, _)| 1000 + *j as i64)
        .collect();
    for row in [0, 2] {
        assert_eq!(
            recs.value(row)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec(),
            want
        );
    }
    let fallback: Vec<i64> = popular.iter().map(|&i| 1000 + i as i64).collect();
    assert_eq!(
        recs.value(1)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .values()
            .to_vec(),
        fallback
    );
    assert_eq!(RunStats::get(&ctx.stage_stats().cache_hits), 1);
    assert_eq!(RunStats::get(&ctx.stage_stats().cache_misses), 1);
}

#[test]
fn the_user_cache_overwrites_the_oldest_and_expires() {
    let t0 = Instant::now();
    let mut cache = UserCache::new(2, 1, std::time::Duration::from_secs(10));
    cache.insert(1, t0, &[11], &[1.0]);
    cache.insert(2, t0, &[22], &[2.0]);
    cache.insert(3, t0, &[33], &[3.0]);
    assert!(cache.get(1, t0).is_none(), "the oldest went");
    assert_eq!(cache.entry(cache.get(3, t0).unwrap()).0, [33]);
    assert!(
        cache
            .get(2, t0 + std::time::Duration::from_secs(11))
            .is_none(),
        "expired"
    );
}

#[test]
fn a_parquet_model_scores_like_the_same_json_model() {
    use arrow::array::{Float64Builder, ListBuilder as Lists};
    let dir = tempfile::tempdir().unwrap();
    let (weights, vectors, popularity) = (
        vec![1.0f32, 0.5],
        vec![vec![0.1, 0.9], vec![0.8, 0.2], vec![0.5, 0.5]],
        vec![3.0f32, 1.0, 2.0],
    );
    let json = serde_json::json!({
        "weights": weights,
        "content": (0..3).map(|j| serde_json::json!({
            "id": 100 + j, "vector": vectors[j], "popularity": popularity[j]
        })).collect::<Vec<_>>(),
    });
    std::fs::write(dir.path().join("m.json"), json.to_string()).unwrap();
    let mut vector = Lists::new(Float64Builder::new());
    for v in &vectors {
        v.iter().for_each(|x| vector.values().append_value(*x));
        vector.append(true);
    }
    let batch = RecordBatch::try_from_iter([
        (
            "id",
            Arc::new(Int64Array::from(vec![100, 101, 102])) as ArrayRef,
        ),
        ("vector", Arc::new(vector.finish()) as ArrayRef),
        (
            "popularity",
            Arc::new(Float32Array::from(popularity.clone())) as ArrayRef,
        ),
    ])
    .unwrap();
    let file = std::fs::File::create(dir.path().join("m.parquet")).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.append_key_value_metadata(parquet::file::metadata::KeyValue::new(
        "weights".to_string(),
        serde_json::to_string(&weights).unwrap(),
    ));
    writer.close().unwrap();
    let from_json = Model::load(&dir.path().join("m.json"), 2).unwrap();
    let from_parquet = Model::load(&dir.path().join("m.parquet"), 2).unwrap();
    assert_eq!(from_parquet.ids, from_json.ids);
    assert_eq!(from_parquet.by_feature, from_json.by_feature);
    assert_eq!(from_parquet.popular, vec![0, 2], "most popular first");
    assert_eq!(from_parquet.popular, from_json.popular);
}

#[test]
fn model_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    std::fs::write(
        &path,
        r#"{"weights": [1, 2], "content": [{"id": 1, "vector": [1, 2, 3]}]}"#,
    )
    .unwrap();
    let err = Model::load(&path, 3).err().unwrap().to_string();
    assert!(
        err.contains("title 1 has 3 features, the weights 2"),
        "{err}"
    );
    let err = Model::load(&dir.path().join("none.json"), 3)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("none.json"), "{err}");
}
