//! Metrics of a tensor pair. The reference is always the first argument and
//! the denominator of relative measures.

use serde::{Deserialize, Serialize};

/// How far a candidate tensor is from the reference's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Elements compared: the shorter side's length (for a shape mismatch,
    /// the reference's element count).
    pub n: usize,
    /// Same length and every pair equal: the same bits, equal as floats
    /// (`-0 == +0`) or NaN on both sides.
    pub exact: bool,
    /// Largest |reference − candidate| over finite pairs.
    pub max_abs: f64,
    /// Largest |reference − candidate| / |reference| over finite pairs;
    /// `f64::MAX` where the reference is 0 and the candidate is not.
    pub max_rel: f64,
    /// Σ(a-b)² / Σa² (0 when both are all-zero).
    pub nmse: f64,
    /// Cosine similarity over finite pairs (1 when both are all-zero, 0 when
    /// only one is).
    pub cosine: f64,
    /// Largest distance in units in the last place (f32), over finite pairs.
    pub max_ulp: u64,
    /// Elements outside atol + rtol·|ref| (for the rule the stage was judged by).
    pub n_outside: usize,
    /// NaN elements on the reference side.
    pub nan_reference: usize,
    /// Infinite elements on the reference side.
    pub inf_reference: usize,
    /// NaN elements on the candidate side.
    pub nan_candidate: usize,
    /// Infinite elements on the candidate side.
    pub inf_candidate: usize,
    /// Top-1, top-k and KL metrics: set for the logits stage when the shapes
    /// match, `None` otherwise.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub logits: Option<LogitMetrics>,
    /// The candidate's shape, when it differs from the reference's (then no
    /// element-wise metric means anything and the stage fails).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub candidate_shape: Option<Vec<usize>>,
}

/// Metrics that only mean something for logits ([T, V]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogitMetrics {
    /// Rows (positions) whose argmax agrees.
    pub top1_agree: usize,
    /// Rows compared: the shorter side's length over the vocabulary size.
    pub rows: usize,
    /// The k of `topk_overlap`.
    pub top_k: usize,
    /// Mean over rows of the fraction of the reference's top-k tokens that
    /// are also in the candidate's top-k (1 when there are no rows).
    pub topk_overlap: f64,
    /// Largest KL(reference ‖ candidate) over rows, in nats.
    pub max_kl: f64,
}

/// One element where the two sides differ most.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorstElement {
    /// Index into the canonical layout, flattened row-major.
    pub flat_index: usize,
    /// The same position as one index per dimension of the stage's shape.
    pub index: Vec<usize>,
    /// The reference's value there.
    ///
    /// Non-finite values are written as the strings "NaN", "inf", "-inf"
    /// (JSON has no such numbers), so a receipt keeps what it saw.
    #[serde(with = "json_float")]
    pub reference: f32,
    /// The candidate's value there, encoded like `reference`.
    #[serde(with = "json_float")]
    pub candidate: f32,
    /// The f64 oracle's value there, when the oracle could recompute the stage.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub oracle: Option<f64>,
    /// |reference − candidate|; `f64::MAX` when the two differ and either is
    /// not finite.
    pub abs_diff: f64,
}

/// f32 values in JSON: numbers when finite, else "NaN" / "inf" / "-inf".
mod json_float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        match *v {
            v if v.is_nan() => s.serialize_str("NaN"),
            f32::INFINITY => s.serialize_str("inf"),
            f32::NEG_INFINITY => s.serialize_str("-inf"),
            v => s.serialize_f32(v),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f32),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(v) => Ok(v),
            Repr::Text(t) => match t.as_str() {
                "NaN" => Ok(f32::NAN),
                "inf" => Ok(f32::INFINITY),
                "-inf" => Ok(f32::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!(
                    "`{other}` is not a float"
                ))),
            },
        }
    }
}

/// JSON has no infinity: clamp to the largest finite f64.
pub fn finite_or_max(x: f64) -> f64 {
    if x.is_nan() {
        f64::MAX
    } else {
        x.clamp(-f64::MAX, f64::MAX)
    }
}

fn ulp_distance(a: f32, b: f32) -> u64 {
    // Map the float bit patterns to a monotonic integer line.
    fn key(x: f32) -> i64 {
        let bits = x.to_bits() as i32;
        if bits < 0 {
            i64::from(i32::MIN) - i64::from(bits)
        } else {
            i64::from(bits)
        }
    }
    key(a).abs_diff(key(b))
}

/// Computes every metric; `atol`/`rtol` set what "outside" means.
pub fn compute(reference: &[f32], candidate: &[f32], atol: f64, rtol: f64) -> Metrics {
    let n = reference.len().min(candidate.len());
    let mut m = Metrics {
        n,
        exact: reference.len() == candidate.len(),
        max_abs: 0.0,
        max_rel: 0.0,
        nmse: 0.0,
        cosine: 1.0,
        max_ulp: 0,
        n_outside: 0,
        nan_reference: 0,
        inf_reference: 0,
        nan_candidate: 0,
        inf_candidate: 0,
        logits: None,
        candidate_shape: None,
    };
    if reference.len() == candidate.len()
        && reference
            .iter()
            .zip(candidate)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    {
        // Bit-identical (most stages of a correct candidate): the loop below
        // would find no difference; only the squares and the non-finite
        // counts remain, summed in the same order, so every number is the
        // one the full loop gives.
        let mut ref2 = 0f64;
        for &a in reference {
            if a.is_finite() {
                let a64 = f64::from(a);
                ref2 += a64 * a64;
            } else if a.is_nan() {
                m.nan_reference += 1;
            } else {
                m.inf_reference += 1;
            }
        }
        m.nan_candidate = m.nan_reference;
        m.inf_candidate = m.inf_reference;
        m.cosine = if ref2 > 0.0 {
            ref2 / (ref2.sqrt() * ref2.sqrt())
        } else {
            1.0
        };
        return m;
    }
    let (reference, candidate) = (&reference[..n], &candidate[..n]);
    if all_finite(reference, f32::is_finite) && all_finite(candidate, f32::is_finite) {
        // Every pair finite (any stage of an engine without NaN or Inf).
        finite_pairs(&mut m, reference, candidate, atol, rtol);
        return m;
    }
    let (mut err2, mut ref2, mut cand2, mut dot) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in reference.iter().zip(candidate) {
        let (a64, b64) = (f64::from(a), f64::from(b));
        if a.is_finite() && b.is_finite() {
            // The common case, with the general branch's arithmetic in its
            // order: finite values are the same exactly when equal.
            m.exact &= a == b;
            let d = (a64 - b64).abs();
            m.max_abs = m.max_abs.max(d);
            if a64 != 0.0 {
                // d / |a| can only raise the maximum when d exceeds
                // max_rel · |a| (less a margin for that product's rounding,
                // when it is a normal number): most elements skip the
                // division.
                let bound = m.max_rel * a64.abs();
                if !(bound.is_normal() && d < bound * (1.0 - 1e-15)) {
                    m.max_rel = m.max_rel.max(d / a64.abs());
                }
            } else if d > 0.0 {
                m.max_rel = f64::MAX;
            }
            m.max_ulp = m.max_ulp.max(ulp_distance(a, b));
            err2 += d * d;
            ref2 += a64 * a64;
            cand2 += b64 * b64;
            dot += a64 * b64;
            if d > atol + rtol * a64.abs() {
                m.n_outside += 1;
            }
            continue;
        }
        m.nan_reference += a.is_nan() as usize;
        m.inf_reference += a.is_infinite() as usize;
        m.nan_candidate += b.is_nan() as usize;
        m.inf_candidate += b.is_infinite() as usize;
        // NaN on both sides at the same place is agreement, whatever the
        // payload bits (the engines' NaNs need not share a sign or payload).
        let same = a.to_bits() == b.to_bits() || a == b || (a.is_nan() && b.is_nan());
        if !same {
            m.exact = false;
            m.n_outside += 1;
        }
    }
    set_sums(&mut m, err2, ref2, cand2, dot);
    if m.nan_candidate + m.inf_candidate + m.nan_reference + m.inf_reference > 0 && !m.exact {
        // Non-finite values on one side only: no finite error measure means anything.
        let same_places = reference
            .iter()
            .zip(candidate)
            .all(|(a, b)| a.is_finite() == b.is_finite());
        if !same_places {
            m.nmse = f64::MAX;
        }
    }
    m
}

/// Whether `finite` holds for every value: without an early exit inside a
/// block, so that the compiler vectorizes the test.
pub(crate) fn all_finite<T: Copy>(xs: &[T], finite: impl Fn(T) -> bool) -> bool {
    xs.chunks(256)
        .all(|block| block.iter().fold(true, |ok, &x| ok & finite(x)))
}

/// NMSE and cosine from the four sums over finite pairs.
fn set_sums(m: &mut Metrics, err2: f64, ref2: f64, cand2: f64, dot: f64) {
    m.nmse = if ref2 > 0.0 {
        err2 / ref2
    } else if err2 > 0.0 {
        f64::MAX
    } else {
        0.0
    };
    m.cosine = if ref2 > 0.0 && cand2 > 0.0 {
        dot / (ref2.sqrt() * cand2.sqrt())
    } else if ref2 == cand2 {
        1.0
    } else {
        0.0
    };
}

/// [`compute`]'s numbers for pairs that are all finite, as the general loop
/// gives them bit for bit: the four sums element by element in order (their
/// roundings make the order part of the result), then the maxima and
/// counts, which no order changes, in lanes ([`order_free`]).
fn finite_pairs(m: &mut Metrics, reference: &[f32], candidate: &[f32], atol: f64, rtol: f64) {
    let (mut err2, mut ref2, mut cand2, mut dot) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in reference.iter().zip(candidate) {
        let (a64, b64) = (f64::from(a), f64::from(b));
        let d = (a64 - b64).abs();
        err2 += d * d;
        ref2 += a64 * a64;
        cand2 += b64 * b64;
        dot += a64 * b64;
    }
    let o = order_free(reference, candidate, atol, rtol);
    m.max_abs = o.max_abs;
    m.max_rel = o.max_rel;
    m.max_ulp = o.max_ulp;
    m.n_outside = o.outside;
    m.exact &= !o.differ;
    set_sums(m, err2, ref2, cand2, dot);
}

/// The maxima and counts of finite pairs.
#[derive(Debug, Default, PartialEq)]
struct OrderFree {
    max_abs: f64,
    max_rel: f64,
    max_ulp: u64,
    outside: usize,
    differ: bool,
}

/// [`order_free_lanes`] built for AVX2 where the CPU has it (the compiler
/// vectorizes the lanes), else for the baseline.
fn order_free(reference: &[f32], candidate: &[f32], atol: f64, rtol: f64) -> OrderFree {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above); the function is safe
        // code compiled with that feature enabled.
        return unsafe { order_free_avx2(reference, candidate, atol, rtol) };
    }
    order_free_lanes(reference, candidate, atol, rtol)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn order_free_avx2(reference: &[f32], candidate: &[f32], atol: f64, rtol: f64) -> OrderFree {
    order_free_lanes(reference, candidate, atol, rtol)
}

/// Lanes of [`order_free_lanes`]: element i goes to lane i mod LANES.
const LANES: usize = 8;

/// Largest |a − b|, largest |a − b| / |a| (`f64::MAX` where a is 0 and b is
/// not), largest ULP distance, pairs outside `atol + rtol·|a|`, and whether
/// any pair differs, of finite pairs: each lane over its elements, then
/// the lanes together (maxima and counts of any grouping are the same).
#[inline(always)]
fn order_free_lanes(reference: &[f32], candidate: &[f32], atol: f64, rtol: f64) -> OrderFree {
    let mut max_abs = [0f64; LANES];
    let mut max_rel = [0f64; LANES];
    let mut max_ulp = [0u64; LANES];
    let mut outside = [0u64; LANES];
    let mut differ = [0u32; LANES];
    let mut pair = |k: usize, a: f32, b: f32| {
        let (a64, b64) = (f64::from(a), f64::from(b));
        let d = (a64 - b64).abs();
        // Compare-and-select rather than `f64::max`: no NaN here, and the
        // compiler vectorizes it.
        max_abs[k] = if d > max_abs[k] { d } else { max_abs[k] };
        let rel = if a64 != 0.0 {
            d / a64.abs()
        } else if d > 0.0 {
            f64::MAX
        } else {
            0.0
        };
        max_rel[k] = if rel > max_rel[k] { rel } else { max_rel[k] };
        let u = ulp_distance(a, b);
        max_ulp[k] = if u > max_ulp[k] { u } else { max_ulp[k] };
        outside[k] += u64::from(d > atol + rtol * a64.abs());
        differ[k] |= u32::from(a != b);
    };
    let (ra, ca) = (reference.chunks_exact(LANES), candidate.chunks_exact(LANES));
    let (tail_r, tail_c) = (ra.remainder(), ca.remainder());
    for (r, c) in ra.zip(ca) {
        for k in 0..LANES {
            pair(k, r[k], c[k]);
        }
    }
    for (k, (&a, &b)) in tail_r.iter().zip(tail_c).enumerate() {
        pair(k, a, b);
    }
    OrderFree {
        max_abs: max_abs.into_iter().fold(0.0, f64::max),
        max_rel: max_rel.into_iter().fold(0.0, f64::max),
        max_ulp: max_ulp.into_iter().max().unwrap_or(0),
        outside: outside.into_iter().sum::<u64>() as usize,
        differ: differ.iter().any(|&d| d != 0),
    }
}

/// The metrics of a stage whose two tensors have different shapes: not
/// exact, every element outside, NMSE the largest finite number (JSON has
/// no infinity), and the candidate's shape recorded so the report can say so.
pub fn shape_mismatch(reference_shape: &[usize], candidate_shape: &[usize]) -> Metrics {
    let n_ref: usize = reference_shape.iter().product();
    let n_cand: usize = candidate_shape.iter().product();
    let mut m = compute(&[], &[], 0.0, 0.0);
    m.exact = false;
    m.nmse = f64::MAX;
    m.cosine = 0.0;
    m.n = n_ref;
    m.n_outside = n_ref.max(n_cand);
    m.candidate_shape = Some(candidate_shape.to_vec());
    m
}

/// NMSE of `x` against the f64 oracle `o`.
pub fn nmse_f64(o: &[f64], x: &[f32]) -> f64 {
    let (mut err2, mut o2) = (0f64, 0f64);
    for (&a, &b) in o.iter().zip(x) {
        let d = a - f64::from(b);
        err2 += d * d;
        o2 += a * a;
    }
    if !err2.is_finite() {
        f64::INFINITY
    } else if o2 > 0.0 {
        err2 / o2
    } else if err2 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// Top-1, top-k overlap and KL over the rows of [rows, vocab] logits.
pub fn logit_metrics(
    reference: &[f32],
    candidate: &[f32],
    vocab: usize,
    top_k: usize,
) -> LogitMetrics {
    let rows = reference
        .len()
        .min(candidate.len())
        .checked_div(vocab)
        .unwrap_or(0);
    // Rows in parallel (a prefill's are many vocabularies long), summed in
    // row order as a sequential loop would.
    use rayon::prelude::*;
    let per_row: Vec<(bool, f64, f64)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let a = &reference[r * vocab..(r + 1) * vocab];
            let b = &candidate[r * vocab..(r + 1) * vocab];
            let ta = top_indices(a, top_k);
            let tb = top_indices(b, top_k);
            (
                ta.first() == tb.first(),
                ta.iter().filter(|i| tb.contains(i)).count() as f64 / top_k.max(1) as f64,
                kl(a, b),
            )
        })
        .collect();
    let (mut agree, mut overlap, mut max_kl) = (0usize, 0f64, 0f64);
    for (same_top1, o, k) in per_row {
        agree += same_top1 as usize;
        overlap += o;
        max_kl = max_kl.max(k);
    }
    LogitMetrics {
        top1_agree: agree,
        rows,
        top_k,
        topk_overlap: if rows > 0 { overlap / rows as f64 } else { 1.0 },
        max_kl: finite_or_max(max_kl),
    }
}

/// Indices of the k largest values, largest first, ties to the lower index.
pub fn top_indices(x: &[f32], k: usize) -> Vec<usize> {
    let order = |&i: &usize, &j: &usize| x[j].total_cmp(&x[i]).then(i.cmp(&j));
    let mut idx: Vec<usize> = (0..x.len()).collect();
    if k < idx.len() && k > 0 {
        // Partial selection: O(V) instead of sorting a 128k vocabulary.
        idx.select_nth_unstable_by(k - 1, order);
    }
    idx.truncate(k);
    idx.sort_by(order);
    idx
}

/// Greedy token: argmax, ties to the lower id (NaN ranks highest, as in
/// `total_cmp`).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate().skip(1) {
        if v.total_cmp(&x[best]).is_gt() {
            best = i;
        }
    }
    best
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = x
        .iter()
        .map(|&v| (f64::from(v) - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    x.iter().map(|&v| f64::from(v) - lse).collect()
}

fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lp = log_softmax(p_logits);
    let lq = log_softmax(q_logits);
    lp.iter()
        .zip(&lq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// One position's next-token distributions compared as `llama-perplexity
/// --kl-divergence` compares them (`kl_divergence` in
/// `tools/perplexity/perplexity.cpp`), from full-precision logits: both rows
/// go through a log-softmax in f64.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionKl {
    /// KL(P_ref ‖ P_cand) = Σ p_ref (log p_ref − log p_cand), in nats.
    pub kl: f64,
    /// The reference's most probable token.
    pub reference_top: u32,
    /// The candidate's most probable token.
    pub candidate_top: u32,
    /// The reference's probability of its own top token.
    pub reference_top_p: f64,
    /// The candidate's probability of the reference's top token.
    pub candidate_top_p: f64,
}

/// [`PositionKl`] of one row of logits per side (the same vocabulary).
/// Non-finite results (NaN logits) are clamped as [`finite_or_max`] does,
/// so a receipt or sweep file can hold them.
pub fn position_kl(reference: &[f32], candidate: &[f32]) -> PositionKl {
    let lp = log_softmax(reference);
    let lq = log_softmax(candidate);
    let kl = lp
        .iter()
        .zip(&lq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>();
    let reference_top = argmax(reference);
    let p_of = |logp: &[f64]| {
        let p = logp.get(reference_top).map_or(0.0, |&l| l.exp());
        if p.is_nan() {
            0.0
        } else {
            p
        }
    };
    PositionKl {
        // A KL below zero is rounding: clamped as `kl` does for receipts
        // (a NaN stays NaN here and becomes the largest finite number).
        kl: finite_or_max(if kl < 0.0 { 0.0 } else { kl }),
        reference_top: reference_top as u32,
        candidate_top: argmax(candidate) as u32,
        reference_top_p: p_of(&lp),
        candidate_top_p: p_of(&lq),
    }
}

/// The `k` elements with the largest absolute difference (NaN/Inf first),
/// ties to the lower index, so receipts are deterministic.
pub fn worst_elements(
    reference: &[f32],
    candidate: &[f32],
    shape: &[usize],
    oracle: Option<&[f64]>,
    k: usize,
) -> Vec<WorstElement> {
    let diff = |i: usize| {
        let (a, b) = (reference[i], candidate[i]);
        if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) {
            0.0
        } else if a.is_finite() && b.is_finite() {
            (f64::from(a) - f64::from(b)).abs()
        } else {
            f64::INFINITY
        }
    };
    let n = reference.len().min(candidate.len());
    let mut idx: Vec<usize> = (0..n).filter(|&i| diff(i) > 0.0).collect();
    let order = |&i: &usize, &j: &usize| diff(j).total_cmp(&diff(i)).then(i.cmp(&j));
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
    }
    idx.truncate(k);
    idx.sort_by(order);
    idx.into_iter()
        .map(|i| WorstElement {
            flat_index: i,
            index: unravel(i, shape),
            reference: reference[i],
            candidate: candidate[i],
            oracle: oracle.and_then(|o| o.get(i).copied()),
            abs_diff: finite_or_max(diff(i)),
        })
        .collect()
}

/// The multi-index of flat index `i` in a row-major `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for (slot, &dim) in out.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = i % dim;
            i /= dim;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The element loop as first written (every field for every element,
    /// a division each): `compute` must give its numbers bit for bit.
    fn naive(reference: &[f32], candidate: &[f32], atol: f64, rtol: f64) -> Metrics {
        let mut m = compute(&[], &[], 0.0, 0.0);
        m.n = reference.len();
        let (mut err2, mut ref2, mut cand2, mut dot) = (0f64, 0f64, 0f64, 0f64);
        for (&a, &b) in reference.iter().zip(candidate) {
            m.nan_reference += a.is_nan() as usize;
            m.inf_reference += a.is_infinite() as usize;
            m.nan_candidate += b.is_nan() as usize;
            m.inf_candidate += b.is_infinite() as usize;
            let same = a.to_bits() == b.to_bits() || a == b || (a.is_nan() && b.is_nan());
            if !same {
                m.exact = false;
            }
            let (a64, b64) = (f64::from(a), f64::from(b));
            let d = (a64 - b64).abs();
            if a.is_finite() && b.is_finite() {
                m.max_abs = m.max_abs.max(d);
                if a64 != 0.0 {
                    m.max_rel = m.max_rel.max(d / a64.abs());
                } else if d > 0.0 {
                    m.max_rel = f64::MAX;
                }
                m.max_ulp = m.max_ulp.max(ulp_distance(a, b));
                err2 += d * d;
                ref2 += a64 * a64;
                cand2 += b64 * b64;
                dot += a64 * b64;
                if d > atol + rtol * a64.abs() {
                    m.n_outside += 1;
                }
            } else if !same {
                m.n_outside += 1;
            }
        }
        m.nmse = err2 / ref2.max(f64::MIN_POSITIVE);
        m.cosine = dot / (ref2.sqrt() * cand2.sqrt());
        m
    }

    #[test]
    fn compute_is_the_naive_loop() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..200 {
            let n = 1 + (next() % 3000) as usize;
            let special = [
                0.0,
                -0.0,
                f32::NAN,
                f32::INFINITY,
                1e-45,
                1e-40,
                3e38,
                -1e-30,
            ];
            // Cases 3k + 1 are all finite (the fast path), the others
            // may hold NaN and Inf (the general loop).
            let draw = |next: &mut dyn FnMut() -> u64| -> f32 {
                let x = match next() % 16 {
                    0 if case % 3 != 1 => special[(next() % 8) as usize],
                    1 => f32::from_bits(next() as u32),
                    2 => 0.0,
                    _ => ((next() % 20001) as f32 - 10000.0) * 1e-3,
                };
                if case % 3 == 1 && !x.is_finite() {
                    0.5
                } else {
                    x
                }
            };
            let a: Vec<f32> = (0..n).map(|_| draw(&mut next)).collect();
            let b: Vec<f32> = a
                .iter()
                .map(|&x| match next() % 5 {
                    0 => x,
                    1 => draw(&mut next),
                    // Up to 20 %: pairs on both sides of rtol 0.1.
                    2 => x * (1.0 + ((next() % 400) as f32 - 200.0) * 1e-3),
                    _ => x * (1.0 + ((next() % 200) as f32 - 100.0) * 1e-6),
                })
                .collect();
            let (fast, slow) = (compute(&a, &b, 1e-4, 1e-3), naive(&a, &b, 1e-4, 1e-3));
            let relative = (compute(&a, &b, 0.0, 0.1), naive(&a, &b, 0.0, 0.1));
            assert_eq!(relative.0.n_outside, relative.1.n_outside, "case {case}");
            assert_eq!(
                fast.max_rel.to_bits(),
                slow.max_rel.to_bits(),
                "case {case}"
            );
            assert_eq!(
                fast.max_abs.to_bits(),
                slow.max_abs.to_bits(),
                "case {case}"
            );
            assert_eq!(
                (fast.max_ulp, fast.n_outside, fast.exact),
                (slow.max_ulp, slow.n_outside, slow.exact),
                "case {case}"
            );
            assert_eq!(
                (
                    fast.nan_reference,
                    fast.inf_reference,
                    fast.nan_candidate,
                    fast.inf_candidate
                ),
                (
                    slow.nan_reference,
                    slow.inf_reference,
                    slow.nan_candidate,
                    slow.inf_candidate
                ),
                "case {case}"
            );
            if fast.nmse != f64::MAX && fast.nmse > 0.0 {
                assert_eq!(fast.cosine.to_bits(), slow.cosine.to_bits(), "case {case}");
                if slow.nmse.is_finite() {
                    assert_eq!(fast.nmse.to_bits(), slow.nmse.to_bits(), "case {case}");
                }
            }
            if a.iter().chain(&b).all(|x| x.is_finite()) {
                // The lanes built for the baseline and (here) for AVX2.
                let plain = order_free_lanes(&a, &b, 1e-4, 1e-3);
                assert_eq!(plain, order_free(&a, &b, 1e-4, 1e-3), "case {case}");
                assert_eq!(plain.max_rel.to_bits(), fast.max_rel.to_bits());
            }
        }
    }

    #[test]
    fn the_bit_identical_fast_path_gives_the_full_loops_numbers() {
        // The fast path against the full loop on the same values: a copy
        // whose last element is +0.0 instead of -0.0 (equal as floats,
        // different bits) takes the loop. Every field must be the same.
        let a: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.37).sin() * 3.0)
            .chain([f32::NAN, f32::INFINITY, -0.0])
            .collect();
        let fast = compute(&a, &a, 1e-6, 1e-6);
        let mut b = a.clone();
        *b.last_mut().unwrap() = 0.0;
        let slow = compute(&a, &b, 1e-6, 1e-6);
        assert!(fast.exact && slow.exact);
        assert_eq!(fast.nmse, slow.nmse);
        assert_eq!(fast.cosine.to_bits(), slow.cosine.to_bits());
        assert_eq!(
            (fast.max_abs, fast.max_rel, fast.max_ulp),
            (slow.max_abs, slow.max_rel, slow.max_ulp)
        );
        assert_eq!(
            (
                fast.nan_reference,
                fast.inf_reference,
                fast.nan_candidate,
                fast.inf_candidate,
                fast.n_outside
            ),
            (
                slow.nan_reference,
                slow.inf_reference,
                slow.nan_candidate,
                slow.inf_candidate,
                slow.n_outside
            )
        );
    }

    #[test]
    fn identical_is_exact() {
        let a = [1.0f32, -2.0, 0.5];
        let m = compute(&a, &a, 0.0, 0.0);
        assert!(m.exact);
        assert_eq!(m.max_ulp, 0);
        assert_eq!(m.nmse, 0.0);
    }

    #[test]
    fn nan_on_both_sides_is_agreement_nan_on_one_is_not() {
        let a = [f32::NAN, 1.0];
        let b = [-f32::NAN, 1.0];
        let m = compute(&a, &b, 0.0, 0.0);
        assert!(m.exact);
        assert_eq!(m.n_outside, 0);
        let c = [0.5f32, 1.0];
        let m = compute(&a, &c, 1.0, 1.0);
        assert!(!m.exact);
        assert_eq!(m.n_outside, 1);
        assert_eq!(m.nmse, f64::MAX);
    }

    #[test]
    fn one_ulp_is_counted() {
        let a = [1.0f32];
        let b = [f32::from_bits(1.0f32.to_bits() + 1)];
        let m = compute(&a, &b, 0.0, 0.0);
        assert!(!m.exact);
        assert_eq!(m.max_ulp, 1);
        assert_eq!(m.n_outside, 1);
        assert_eq!(ulp_distance(-0.0, 0.0), 0);
        assert_eq!(ulp_distance(f32::from_bits(1), -f32::from_bits(1)), 2);
    }

    #[test]
    fn worst_elements_are_sorted_and_unraveled() {
        let a = [0.0f32, 1.0, 2.0, 3.0];
        let b = [0.0f32, 1.5, 2.0, 5.0];
        let w = worst_elements(&a, &b, &[2, 2], None, 5);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].index, vec![1, 1]);
        assert_eq!(w[1].index, vec![0, 1]);
    }

    #[test]
    fn top_indices_and_argmax_agree_with_a_full_sort() {
        let x = [0.5f32, 3.0, -1.0, 3.0, 2.0, 0.0, 2.5];
        assert_eq!(top_indices(&x, 3), vec![1, 3, 6]);
        assert_eq!(top_indices(&x, 10), vec![1, 3, 6, 4, 0, 5, 2]);
        assert_eq!(argmax(&x), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn kl_of_equal_logits_is_zero() {
        let a = [1.0f32, 2.0, 3.0, 0.0];
        let m = logit_metrics(&a, &a, 4, 2);
        assert_eq!(m.top1_agree, 1);
        assert!(m.max_kl < 1e-12);
        assert_eq!(m.topk_overlap, 1.0);
    }
}
