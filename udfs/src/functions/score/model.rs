//! The model, loaded from JSON or Parquet and laid out feature-major, and the scoring
//! kernels: every title against one user (portable, or AVX2 with FMA), then the top k.

use super::*;

/// The model, laid out for scoring.
pub struct Model {
    pub(super) features: usize,
    pub(super) ids: Vec<i64>,
    /// Blocks of [`BLOCK`] titles, each feature-major: block `b`, feature `f` holds
    /// `weight[f] · title[f]` for the block's titles (the last block padded with zeros).
    pub(super) by_feature: Vec<f32>,
    /// Indices of the `k` most popular titles, and their popularity.
    pub(super) popular: Vec<u32>,
    pub(super) popular_scores: Vec<f32>,
    /// Titles per list: `k`, or fewer when there are fewer titles.
    pub(super) k: usize,
}

#[derive(Deserialize)]
pub(super) struct ModelFile {
    pub(super) weights: Vec<f32>,
    pub(super) content: Vec<ContentEntry>,
}

#[derive(Deserialize)]
pub(super) struct ContentEntry {
    pub(super) id: i64,
    pub(super) vector: Vec<f32>,
    #[serde(default)]
    pub(super) popularity: f32,
}

impl Model {
    pub fn load(path: &Path, k: usize) -> Result<Model> {
        let at = path.display();
        let file = match path.extension().and_then(|e| e.to_str()) {
            Some("json") => {
                let text =
                    std::fs::read(path).map_err(|e| Error::Plan(format!("model {at}: {e}")))?;
                serde_json::from_slice::<ModelFile>(&text)
                    .map_err(|e| Error::Plan(format!("model {at} is not a model file: {e}")))?
            }
            Some("parquet") => {
                read_parquet(path).map_err(|e| Error::Plan(format!("model {at}: {e}")))?
            }
            _ => return plan_err!("model {at}: use a .json or .parquet file"),
        };
        Model::new(file.weights, file.content, k)
            .map_err(|e| Error::Plan(format!("model {at}: {e}")))
    }

    pub(super) fn new(weights: Vec<f32>, content: Vec<ContentEntry>, k: usize) -> Result<Model> {
        let f = weights.len();
        if f == 0 || content.is_empty() {
            return Err(Error::Plan(
                "it needs weights and at least one title".into(),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return plan_err!("a weight is {w}; every number must be finite");
        }
        if let Some(title) = content
            .iter()
            .find(|c| !c.popularity.is_finite() || c.vector.iter().any(|v| !v.is_finite()))
        {
            return plan_err!(
                "title {} has a number that is not finite (NaN or infinite)",
                title.id
            );
        }
        let t = content.len();
        let mut by_feature = vec![0f32; t.div_ceil(BLOCK) * f * BLOCK];
        for (j, title) in content.iter().enumerate() {
            if title.vector.len() != f {
                return plan_err!(
                    "title {} has {} features, the weights {f}",
                    title.id,
                    title.vector.len()
                );
            }
            let (block, lane) = (j / BLOCK, j % BLOCK);
            for (i, v) in title.vector.iter().enumerate() {
                by_feature[(block * f + i) * BLOCK + lane] = weights[i] * v;
            }
        }
        let k = k.min(t);
        let popularity: Vec<f32> = content.iter().map(|c| c.popularity).collect();
        let mut popular = vec![0u32; k];
        let mut popular_scores = vec![0f32; k];
        top_k(&popularity, &mut popular, &mut popular_scores);
        Ok(Model {
            features: f,
            ids: content.iter().map(|c| c.id).collect(),
            by_feature,
            popular,
            popular_scores,
            k,
        })
    }

    pub(super) fn titles(&self) -> usize {
        self.ids.len()
    }

    /// The length of a scores buffer: the titles rounded up to whole blocks.
    pub(super) fn padded(&self) -> usize {
        self.titles().div_ceil(BLOCK) * BLOCK
    }

    /// Every title's score for `user`, into `out` (`padded()` long; the scores of the
    /// padding are 0 and not titles).
    pub(super) fn score_all(&self, user: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { score_all_avx2(user, &self.by_feature, out) };
            return;
        }
        score_all_portable::<false>(user, &self.by_feature, out);
    }
}

/// Titles scored together: their 64 running sums stay in registers (8 AVX registers) while
/// every feature is added in, so each weight·title value is loaded once and no sum goes
/// through memory.
pub(super) const BLOCK: usize = 64;

/// `out[j] = Σ_f user[f] · by_feature[block(j)][f][lane(j)]`, one block of titles at a time.
#[inline(always)]
pub(super) fn score_all_portable<const FMA: bool>(
    user: &[f32],
    by_feature: &[f32],
    out: &mut [f32],
) {
    let f = user.len();
    for (block, out) in by_feature
        .chunks_exact(f * BLOCK)
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let mut acc = [0f32; BLOCK];
        for (row, &u) in block.chunks_exact(BLOCK).zip(user) {
            let row: &[f32; BLOCK] = row.try_into().expect("a whole block");
            for (a, &c) in acc.iter_mut().zip(row) {
                *a = if FMA { u.mul_add(c, *a) } else { *a + u * c };
            }
        }
        out.copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn score_all_avx2(user: &[f32], by_feature: &[f32], out: &mut [f32]) {
    score_all_portable::<true>(user, by_feature, out);
}

/// The `ids.len()` highest of `scores`, best first, into `ids` (indices) and `best`; of
/// equal scores the lower index comes first. NaN scores are never chosen. Returns how many
/// were chosen: fewer than `ids.len()` only when there are fewer non-NaN scores.
///
/// Two passes over blocks of 16 scores. The first takes each block's maximum (SIMD) and
/// keeps the k highest maxima: the k-th of them is a floor, since k distinct scores reach
/// it. The second looks one by one only at the blocks holding a score at or above the
/// floor (one SIMD test per block) — a few dozen scores instead of every one that beats a
/// running k-th best, which rises slowly at first.
pub(super) fn top_k(scores: &[f32], ids: &mut [u32], best: &mut [f32]) -> usize {
    pub(super) const LANES: usize = 16;
    let k = ids.len();
    let mut floor = f32::NEG_INFINITY;
    if scores.len() / LANES >= k {
        let mut filled = 0;
        for (b, block) in scores.chunks_exact(LANES).enumerate() {
            let block: &[f32; LANES] = block.try_into().expect("a whole block");
            let max = block_max(block);
            if filled < k {
                place(ids, best, filled, b, max);
                filled += 1;
            } else if max > best[k - 1] {
                place(ids, best, k, b, max);
            }
        }
        floor = best[k - 1];
    }
    let mut filled = 0;
    let mut consider = |j: usize, s: f32, filled: &mut usize| {
        if s.is_nan() || s < floor {
            return;
        }
        if *filled < k {
            place(ids, best, *filled, j, s);
            *filled += 1;
        } else if s > best[k - 1] {
            place(ids, best, k, j, s);
        }
    };
    let mut blocks = scores.chunks_exact(LANES);
    for (b, block) in (&mut blocks).enumerate() {
        let block: &[f32; LANES] = block.try_into().expect("a whole block");
        if block.iter().fold(false, |any, &s| any | (s >= floor)) {
            for (i, &s) in block.iter().enumerate() {
                consider(b * LANES + i, s, &mut filled);
            }
        }
    }
    let tail = scores.len() - blocks.remainder().len();
    for (i, &s) in blocks.remainder().iter().enumerate() {
        consider(tail + i, s, &mut filled);
    }
    filled
}

/// The highest of 16 scores, NaN ignored (a block of NaN gives -inf). Written as two
/// 8-wide element-wise maxima and then a short horizontal one, which the compiler turns into
/// SIMD `max` instructions (a plain fold is a serial chain it may not reorder).
#[inline(always)]
pub(super) fn block_max(block: &[f32; 16]) -> f32 {
    let pick = |a: f32, b: f32| if b > a { b } else { a };
    let mut m = [f32::NEG_INFINITY; 8];
    for half in block.chunks_exact(8) {
        for (m, &s) in m.iter_mut().zip(half) {
            *m = pick(*m, s);
        }
    }
    let m4: [f32; 4] = std::array::from_fn(|i| pick(m[i], m[i + 4]));
    pick(pick(m4[0], m4[2]), pick(m4[1], m4[3]))
}

/// Puts score `s` of title `j` into the best-first list of `len` entries (`len < k`: it
/// grows by one; `len == k`: the last falls off), after every score `>= s`.
#[inline]
pub(super) fn place(ids: &mut [u32], best: &mut [f32], len: usize, j: usize, s: f32) {
    // Shifted one by one: for a short list this beats two `copy_within` calls (memmove).
    let mut at = len.min(ids.len() - 1);
    while at > 0 && best[at - 1] < s {
        best[at] = best[at - 1];
        ids[at] = ids[at - 1];
        at -= 1;
    }
    ids[at] = j as u32;
    best[at] = s;
}

pub(super) fn read_parquet(
    path: &Path,
) -> Result<ModelFile, Box<dyn std::error::Error + Send + Sync>> {
    let file = std::fs::File::open(path)?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?;
    let weights = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|e| e.key == "weights"))
        .and_then(|e| e.value.clone())
        .ok_or("no `weights` in the file's key-value metadata")?;
    let weights: Vec<f32> = serde_json::from_str(&weights)?;
    let mut content = Vec::new();
    for batch in builder.build()? {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| format!("no column `{name}`"))
        };
        let ids = cast(column("id")?, &DataType::Int64)?;
        let vectors = cast(column("vector")?, &list_of(DataType::Float32))?;
        let popularity = match batch.column_by_name("popularity") {
            Some(p) => cast(p, &DataType::Float32)?,
            None => Arc::new(Float32Array::from(vec![0.0; batch.num_rows()])),
        };
        let (ids, vectors, popularity) = (
            ids.as_primitive::<arrow::datatypes::Int64Type>(),
            vectors.as_list::<i32>(),
            popularity.as_primitive::<Float32Type>(),
        );
        for row in 0..batch.num_rows() {
            let vector = vectors.value(row);
            content.push(ContentEntry {
                id: ids.value(row),
                vector: vector.as_primitive::<Float32Type>().values().to_vec(),
                popularity: popularity.value(row),
            });
        }
    }
    Ok(ModelFile { weights, content })
}
