//! The evaluation core of the tree ensembles: a validated [`Spec`] is flattened once into
//! compact node arrays ([`Forest`]), which score rows in blocks, several traversals in
//! lockstep, with no allocation beyond a per-call scratch.
//!
//! Layout: every node, leaves included, is a [`Node`] `{feature, a, b, threshold}` in one
//! array (16 bytes for `f32` thresholds). A leaf points to itself on both sides, so a
//! traversal is simply "step `depth` times" and needs no per-lane leaf test; a lane that
//! reached its leaf stays there, and a block stops early once no lane moved.
//!
//! Comparison kernels: when every branch is `<=`/`<`/`>=`/`>` the nodes are normalised to
//! one operator (`v <= t` or `v < t` selects `a`; `>=`/`>` swap the children) with a per-node
//! "NaN goes to `a`" bit in the feature word; the traversal then is one compare and one
//! select per level. Anything else (`==`, `!=`, set membership, or a mix of `<=` and `<`)
//! uses the general kernel, which follows onnxruntime's per-node rules literally.
//!
//! Accumulation follows onnxruntime's order exactly (trees in order, a leaf's weights in
//! attribute order) in the threshold precision `T`: `f32` for float/integer inputs, `f64`
//! for double inputs or double attributes.

use std::fmt;
use std::ops::{Add, AddAssign, Div, Neg, Sub};

use tract_onnx::tract_hir::internal::*;

/// Deepest tree accepted (edges from root to the farthest leaf).
pub(crate) const MAX_DEPTH: u32 = 1 << 14;
/// Traversals run in lockstep: rows of a block through one tree, or trees for one row.
const LANES: usize = 8;
/// Rows scored together, tree by tree, so one tree's nodes stay in cache: `1 << SHIFT`.
/// A block is stored feature-major (`block[(f << SHIFT) + row]`), so the lanes of a step
/// read neighbouring values and need no per-lane row offset.
const SHIFT: u32 = 7;
/// The same for very wide inputs, to bound the block's size.
const SHIFT_WIDE: u32 = 3;
/// Widths beyond which blocks use [`SHIFT_WIDE`].
const WIDE: usize = 1 << 13;
/// Feature ids are stored in the low 31 bits of [`Node::feature`]; the top bit is a flag.
const FEATURE_MASK: u32 = 0x7fff_ffff;
const FLAG: u32 = 0x8000_0000;

/// The threshold / accumulation precision: `f32` or `f64`.
pub(crate) trait Num:
    Copy
    + Default
    + PartialOrd
    + Add<Output = Self>
    + AddAssign
    + Sub<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    const ZERO: Self;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
}

impl Num for f32 {
    const ZERO: f32 = 0.0;
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn from_usize(v: usize) -> f32 {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Num for f64 {
    const ZERO: f64 = 0.0;
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn from_usize(v: usize) -> f64 {
        v as f64
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// One accumulated score, as onnxruntime's `ScoreValue`: a score no leaf contributed to
/// (`has == false`) reads as 0 when written out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Sv<T> {
    pub score: T,
    pub has: bool,
}

impl<T: Num> Sv<T> {
    /// The value onnxruntime's `ScoreValue` converts to.
    pub fn value(self) -> T {
        if self.has {
            self.score
        } else {
            T::ZERO
        }
    }
}

/// `aggregate_function`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Agg {
    #[default]
    Sum,
    Average,
    Min,
    Max,
}

/// A branch condition of the specification (the node "is true" when it holds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Cond {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    /// Set membership (TreeEnsemble v5): the values are `Spec::sets[start..start + len]`.
    Member {
        start: usize,
        len: usize,
    },
}

/// A node of the specification; child indices point into `Spec::nodes`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum SpecNode {
    Branch {
        cond: Cond,
        feature: u32,
        threshold: f64,
        missing_true: bool,
        t: usize,
        f: usize,
    },
    /// `value` is what a one-target ensemble adds when the leaf has no weight (onnxruntime
    /// keeps the node's `nodes_values` entry there); weights are
    /// `Spec::weights[w_start..w_start + w_len]`, `(target, weight)` in attribute order.
    Leaf {
        value: f64,
        w_start: usize,
        w_len: usize,
    },
}

/// A parsed, not yet validated ensemble: what both attribute formats (v3 and v5) become.
#[derive(Clone, Debug, Default)]
pub(crate) struct Spec {
    pub nodes: Vec<SpecNode>,
    pub weights: Vec<(u32, f64)>,
    pub sets: Vec<f64>,
    /// One entry per tree, in evaluation order (a node may root several trees).
    pub roots: Vec<usize>,
    /// Targets (regressors, TreeEnsemble) or classes (classifiers); target ids are `< n`.
    pub n: usize,
    pub agg: Agg,
}

/// A flattened node: 12 bytes for `f32`. A branch's two children are adjacent: the step goes
/// to `c + 1` when its condition selects side "a", else to `c`. Leaves (and the rare jump
/// slots standing in for a subtree laid out elsewhere) have a NaN threshold, so no
/// comparison holds and the step always goes to `c`: themselves for a leaf, the target for
/// a jump (one less under the all-NaN-to-"a" kernel, where the comparison always holds).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Node<T> {
    /// Feature index (low 31 bits) and a flag: "NaN goes to a" for the mixed fast kernel,
    /// "missing value tracks true" for the general one.
    feature: u32,
    c: u32,
    threshold: T,
}

/// What a slot of the flat layout holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Spec node `n`; its children are at `c` ("b") and `c + 1` ("a").
    Branch {
        n: usize,
        c: u32,
    },
    Leaf {
        n: usize,
    },
    /// Goes on to slot `to` (a shared subtree's second parent).
    Jump {
        to: u32,
    },
}

/// Condition codes of the general kernel.
const C_LEQ: u8 = 0;
const C_LT: u8 = 1;
const C_GTE: u8 = 2;
const C_GT: u8 = 3;
const C_EQ: u8 = 4;
const C_NEQ: u8 = 5;
const C_MEMBER: u8 = 6;
const C_LEAF: u8 = 7;

/// NaN handling of a fast kernel.
const NAN_NONE: u8 = 0;
const NAN_ALL: u8 = 1;
const NAN_MIXED: u8 = 2;
/// A mixed kernel on a block without NaN: the flags are masked off and never needed.
const NAN_CLEAN: u8 = 3;
/// Mixed NaN directions resolved by the data: each feature is given twice, with NaN as
/// -inf (plane 0: `v <= t`/`v < t` hold, the walk goes to "a") and as +inf (plane 1: they
/// do not), and each node reads feature `2f + plane`. The plain kernel then suffices.
const NAN_PLANES: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walk {
    /// `v < t` (`lt`) or `v <= t` selects `a`; NaN per `nan`.
    Fast {
        lt: bool,
        nan: u8,
    },
    General,
}

/// What a leaf adds, per accumulation strategy.
#[derive(Clone, Debug, PartialEq)]
enum Payload<T> {
    /// One target: the leaf's value, indexed by node.
    Single { value: Vec<T> },
    /// Sum/average over few targets where no leaf repeats a target: each tree writes a fixed
    /// target list, each of its leaves holds one weight per listed target (0 where it had
    /// none) and a bit mask of the targets it really had.
    Dense {
        /// The row-independent "has score" mask, when there is one.
        fixed: Option<u64>,
        offset: Vec<u32>,
        mask: Vec<u64>,
        weights: Vec<T>,
        trees: Vec<DenseTree>,
        targets: Vec<u32>,
    },
    /// Anything else: `(target, weight)` lists, with per-row "has score" flags.
    Sparse {
        offset: Vec<u32>,
        len: Vec<u32>,
        weights: Vec<(u32, T)>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct DenseTree {
    start: u32,
    len: u32,
    /// The target list is `0..n`.
    all: bool,
}

/// A validated, flattened ensemble in precision `T`.
#[derive(Clone, PartialEq)]
pub(crate) struct Forest<T> {
    nodes: Vec<Node<T>>,
    /// General kernel only: condition code and member-set range per node.
    conds: Vec<u8>,
    sets: Vec<(u32, u32)>,
    set_values: Vec<T>,
    roots: Vec<u32>,
    /// Per tree: the longest and the shortest root-to-leaf path.
    depths: Vec<u32>,
    sure: Vec<u32>,
    walk: Walk,
    payload: Payload<T>,
    n: usize,
    agg: Agg,
    /// Largest feature index a reachable branch reads.
    max_feature: Option<usize>,
}

impl<T> fmt::Debug for Forest<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forest")
            .field("trees", &self.roots.len())
            .field("nodes", &self.nodes.len())
            .field("walk", &self.walk)
            .field("targets", &self.n)
            .field("agg", &self.agg)
            .finish()
    }
}

impl<T: Num> Forest<T> {
    /// Validates and flattens `spec`: every tree must be acyclic (shared subtrees are fine)
    /// and at most [`MAX_DEPTH`] deep; `what` names the operator in errors.
    pub fn build(spec: &Spec, what: &str) -> TractResult<Forest<T>> {
        ensure!(
            spec.n > 0,
            "{what}: the number of targets/classes must be positive"
        );
        let count = spec.nodes.len();
        ensure!(
            count < (FEATURE_MASK as usize) / 4,
            "{what}: too many nodes ({count})"
        );
        for node in &spec.nodes {
            if let SpecNode::Branch { feature, .. } = node {
                ensure!(
                    *feature < FEATURE_MASK / 2,
                    "{what}: feature index {feature} is too large"
                );
            }
        }
        check_acyclic(spec, what)?;

        // Which kernel: all branches of one ordering family, or the general one.
        let mut le = false;
        let mut lt = false;
        let mut other = false;
        let mut nan_a = 0usize;
        let mut branches = 0usize;
        let mut nan_threshold = false;
        for node in &spec.nodes {
            if let SpecNode::Branch {
                cond,
                missing_true,
                threshold,
                ..
            } = *node
            {
                branches += 1;
                nan_threshold |= threshold.is_nan();
                match fast_form(cond, missing_true) {
                    // `v >= t` is `!(v < t)` only for a number t
                    Some((_, true, _)) if threshold.is_nan() => other = true,
                    Some((true, _, goes_a)) => {
                        lt = true;
                        nan_a += goes_a as usize;
                    }
                    Some((false, _, goes_a)) => {
                        le = true;
                        nan_a += goes_a as usize;
                    }
                    None => other = true,
                }
            }
        }
        let walk = if other || (le && lt) {
            Walk::General
        } else {
            let nan = if nan_a == 0 {
                NAN_NONE
            } else if nan_a == branches && !nan_threshold {
                // `!(v > t)` is "v <= t or v is NaN" only for a number t
                NAN_ALL
            } else if planes_work(spec, lt) {
                NAN_PLANES
            } else {
                NAN_MIXED
            };
            Walk::Fast { lt, nan }
        };
        let planes = walk
            == (Walk::Fast {
                lt,
                nan: NAN_PLANES,
            });
        let general = walk == Walk::General;
        // The "NaN goes to a" bit is only read when nodes differ in it.
        let mixed = walk == (Walk::Fast { lt, nan: NAN_MIXED });
        // Under the all-NaN-to-"a" kernel a NaN threshold makes every step go to c + 1.
        let stay = |to: u32| {
            if walk == (Walk::Fast { lt, nan: NAN_ALL }) {
                to.wrapping_sub(1)
            } else {
                to
            }
        };
        // The (b, a) children of a branch as the chosen kernel sees them.
        let sides = |cond: Cond, missing_true: bool, t: usize, f: usize| -> (usize, usize) {
            match fast_form(cond, missing_true) {
                Some((_, true, _)) if !general => (t, f),
                _ => (f, t),
            }
        };

        // Layout: trees breadth first, a branch's children in two adjacent slots.
        let mut pos = vec![u32::MAX; count];
        let mut slots: Vec<Slot> = Vec::with_capacity(count + 1);
        let mut roots = Vec::with_capacity(spec.roots.len());
        let mut queue = std::collections::VecDeque::new();
        let place = |n: usize, slots: &mut Vec<Slot>, pos: &mut Vec<u32>| -> u32 {
            let at = slots.len() as u32;
            pos[n] = at;
            slots.push(match spec.nodes[n] {
                SpecNode::Branch { .. } => Slot::Branch { n, c: 0 },
                SpecNode::Leaf { .. } => Slot::Leaf { n },
            });
            at
        };
        for &root in &spec.roots {
            if pos[root] == u32::MAX {
                let at = place(root, &mut slots, &mut pos);
                queue.push_back(at);
            }
            roots.push(pos[root]);
            while let Some(at) = queue.pop_front() {
                let Slot::Branch { n, .. } = slots[at as usize] else {
                    continue;
                };
                let SpecNode::Branch {
                    cond,
                    missing_true,
                    t,
                    f,
                    ..
                } = spec.nodes[n]
                else {
                    continue;
                };
                let c = slots.len() as u32;
                slots[at as usize] = Slot::Branch { n, c };
                let (b, a) = sides(cond, missing_true, t, f);
                for child in [b, a] {
                    if pos[child] == u32::MAX {
                        let at = place(child, &mut slots, &mut pos);
                        queue.push_back(at);
                    } else {
                        slots.push(Slot::Jump { to: pos[child] });
                    }
                }
            }
        }
        ensure!(
            slots.len() < (FEATURE_MASK as usize),
            "{what}: too many nodes"
        );

        let mut nodes = Vec::with_capacity(slots.len());
        let mut conds = Vec::new();
        let mut sets = Vec::new();
        let mut set_values = Vec::new();
        let mut max_feature: Option<usize> = None;
        for (i, slot) in slots.iter().enumerate() {
            let i = i as u32;
            let (node, code, set) = match *slot {
                Slot::Leaf { .. } => (
                    Node {
                        feature: 0,
                        c: stay(i),
                        threshold: T::from_f64(f64::NAN),
                    },
                    C_LEAF,
                    (0, 0),
                ),
                Slot::Jump { to } => (
                    Node {
                        feature: 0,
                        c: stay(to),
                        threshold: T::from_f64(f64::NAN),
                    },
                    C_LEAF,
                    (0, 0),
                ),
                Slot::Branch { n, c } => {
                    let SpecNode::Branch {
                        cond,
                        feature,
                        threshold,
                        missing_true,
                        ..
                    } = spec.nodes[n]
                    else {
                        bail!("{what}: internal error: layout");
                    };
                    ensure!(
                        feature <= FEATURE_MASK,
                        "{what}: feature index {feature} is too large"
                    );
                    max_feature =
                        Some(max_feature.map_or(feature as usize, |m| m.max(feature as usize)));
                    let goes_a = fast_form(cond, missing_true).is_some_and(|f| f.2);
                    let flag = if general {
                        missing_true
                    } else {
                        mixed && goes_a
                    };
                    let feature = if planes {
                        2 * feature + u32::from(!goes_a)
                    } else {
                        feature | if flag { FLAG } else { 0 }
                    };
                    let node = Node {
                        feature,
                        c,
                        threshold: T::from_f64(threshold),
                    };
                    let (code, set) = match cond {
                        Cond::Leq => (C_LEQ, (0, 0)),
                        Cond::Lt => (C_LT, (0, 0)),
                        Cond::Gte => (C_GTE, (0, 0)),
                        Cond::Gt => (C_GT, (0, 0)),
                        Cond::Eq => (C_EQ, (0, 0)),
                        Cond::Neq => (C_NEQ, (0, 0)),
                        Cond::Member { start, len } => {
                            let values =
                                spec.sets.get(start..start.saturating_add(len)).ok_or_else(
                                    || format_err!("{what}: membership values out of range"),
                                )?;
                            let at = set_values.len() as u32;
                            set_values.extend(values.iter().map(|v| T::from_f64(*v)));
                            (C_MEMBER, (at, len as u32))
                        }
                    };
                    (node, code, set)
                }
            };
            nodes.push(node);
            if general {
                conds.push(code);
                sets.push(set);
            }
        }

        // Longest and shortest step counts from each slot to its leaf.
        let (deep, shallow) = slot_depths(&slots, what)?;
        let depths: Vec<u32> = roots.iter().map(|&r| deep[r as usize]).collect();
        let sure: Vec<u32> = roots.iter().map(|&r| shallow[r as usize]).collect();
        let payload = build_payload::<T>(spec, &slots, &roots, what)?;
        Ok(Forest {
            nodes,
            conds,
            sets,
            set_values,
            roots,
            depths,
            sure,
            walk,
            payload,
            n: spec.n,
            agg: spec.agg,
            max_feature,
        })
    }

    /// Which traversal kernel the forest uses (for tests).
    #[cfg(test)]
    pub fn kernel(&self) -> &'static str {
        match self.walk {
            Walk::General => "general",
            Walk::Fast { nan: NAN_NONE, .. } => "fast",
            Walk::Fast { nan: NAN_ALL, .. } => "fast, NaN to a",
            Walk::Fast {
                nan: NAN_PLANES, ..
            } => "fast, NaN planes",
            Walk::Fast { .. } => "fast, NaN flags",
        }
    }

    /// Number of trees.
    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// Largest feature index the ensemble reads, if it has any branch.
    pub fn max_feature(&self) -> Option<usize> {
        self.max_feature
    }

    /// Scores are accumulated per row in a vector of this width.
    fn acc_width(&self) -> usize {
        match self.payload {
            Payload::Single { .. } => 1,
            _ => self.n,
        }
    }

    /// Scores `rows` rows of `x` (row-major, `width` values each; the caller checked
    /// `max_feature < width`); `sink(row, scores)` receives each row's accumulated scores
    /// (one entry for a one-target ensemble, else one per target), before base values.
    pub fn score<F>(&self, x: &[T], width: usize, rows: usize, mut sink: F) -> TractResult<()>
    where
        F: FnMut(usize, &mut [Sv<T>]) -> TractResult<()>,
    {
        ensure!(
            x.len() >= rows.saturating_mul(width),
            "input holds {} values, expected {rows} rows of {width}",
            x.len()
        );
        if let Some(m) = self.max_feature {
            ensure!(
                m < width,
                "a tree reads feature {m} but the input has {width} features"
            );
        }
        if rows == 0 {
            return Ok(());
        }
        let width_acc = self.acc_width();
        let shift = if width > WIDE { SHIFT_WIDE } else { SHIFT };
        let block = if rows < LANES { 1 } else { 1usize << shift };
        let mut acc = Acc::new(&self.payload, block, width_acc);
        let planes = matches!(
            self.walk,
            Walk::Fast {
                nan: NAN_PLANES,
                ..
            }
        );
        let mut doubled: Vec<T> = Vec::new();
        let mut sv = vec![Sv::<T>::default(); width_acc];
        if rows < LANES {
            // Few rows: the lanes are trees.
            for r in 0..rows {
                let mut row = &x[r * width..(r + 1) * width];
                #[allow(clippy::eq_op)]
                let clean = !row.iter().any(|v| v != v);
                if planes {
                    doubled.clear();
                    doubled.extend(row.iter().flat_map(|v| nan_planes(*v)));
                    row = &doubled;
                }
                acc.reset(1);
                let mut t0 = 0;
                while t0 < self.roots.len() {
                    let leaves = self.walk_trees(t0, row, clean);
                    let count = LANES.min(self.roots.len() - t0);
                    self.accumulate_trees(&mut acc, t0, &leaves[..count]);
                    t0 += LANES;
                }
                acc.read(0, &mut sv, self.trees() > 0);
                sink(r, &mut sv)?;
            }
            return Ok(());
        }
        let mut leaves = vec![0u32; block];
        // Lanes past the last row of the final block read stale values; their leaves are
        // dropped.
        let mut xt = vec![T::ZERO; width * block * if planes { 2 } else { 1 }];
        let mut start = 0;
        while start < rows {
            let nb = block.min(rows - start);
            let xb = &x[start * width..(start + nb) * width];
            for (r, row) in xb.chunks_exact(width.max(1)).enumerate() {
                if planes {
                    for (f, v) in row.iter().enumerate() {
                        let [lo, hi] = nan_planes(*v);
                        xt[((2 * f) << shift) + r] = lo;
                        xt[((2 * f + 1) << shift) + r] = hi;
                    }
                } else {
                    for (f, v) in row.iter().enumerate() {
                        xt[(f << shift) + r] = *v;
                    }
                }
            }
            #[allow(clippy::eq_op)]
            let clean = !xb.iter().any(|v| v != v);
            acc.reset(nb);
            for t in 0..self.roots.len() {
                self.walk_rows(t, &xt, shift, clean, &mut leaves[..nb]);
                self.accumulate(&mut acc, t, &leaves[..nb]);
            }
            for r in 0..nb {
                acc.read(r, &mut sv, self.trees() > 0);
                sink(start + r, &mut sv)?;
            }
            start += nb;
        }
        Ok(())
    }

    /// Adds the leaves of trees `t0..t0 + leaves.len()`, in order, to row slot 0.
    fn accumulate_trees(&self, acc: &mut Acc<T>, t0: usize, leaves: &[u32]) {
        match (&self.payload, self.agg) {
            (Payload::Single { value }, Agg::Sum | Agg::Average) => {
                let mut s = acc.scores[0];
                for &leaf in leaves {
                    s += value[leaf as usize];
                }
                acc.scores[0] = s;
            }
            (
                Payload::Dense {
                    offset,
                    mask,
                    weights,
                    trees,
                    targets,
                    fixed,
                },
                _,
            ) => {
                let w = acc.width;
                let row = &mut acc.scores[..w];
                for (j, &leaf) in leaves.iter().enumerate() {
                    let tree = trees[t0 + j];
                    let off = offset[leaf as usize] as usize;
                    if tree.all {
                        for (s, v) in row.iter_mut().zip(&weights[off..off + w]) {
                            *s += *v;
                        }
                    } else {
                        let list = &targets[tree.start as usize..(tree.start + tree.len) as usize];
                        for (&c, v) in list.iter().zip(&weights[off..off + list.len()]) {
                            row[c as usize] += *v;
                        }
                    }
                    if fixed.is_none() {
                        acc.masks[0] |= mask[leaf as usize];
                    }
                }
            }
            _ => {
                for (j, &leaf) in leaves.iter().enumerate() {
                    self.accumulate(acc, t0 + j, std::slice::from_ref(&leaf));
                }
            }
        }
    }

    /// Adds tree `t`'s leaves (one per row slot, from slot 0) to the accumulators.
    fn accumulate(&self, acc: &mut Acc<T>, t: usize, leaves: &[u32]) {
        let first = t == 0;
        let w = acc.width;
        match &self.payload {
            Payload::Single { value } => {
                let scores = &mut acc.scores[..leaves.len()];
                match self.agg {
                    Agg::Sum | Agg::Average => {
                        for (s, &leaf) in scores.iter_mut().zip(leaves) {
                            *s += value[leaf as usize];
                        }
                    }
                    Agg::Min => {
                        for (s, &leaf) in scores.iter_mut().zip(leaves) {
                            let v = value[leaf as usize];
                            if first || v < *s {
                                *s = v;
                            }
                        }
                    }
                    Agg::Max => {
                        for (s, &leaf) in scores.iter_mut().zip(leaves) {
                            let v = value[leaf as usize];
                            if first || v > *s {
                                *s = v;
                            }
                        }
                    }
                }
            }
            Payload::Dense {
                offset,
                mask,
                weights,
                trees,
                targets,
                fixed,
            } => {
                let tree = trees[t];
                let list = &targets[tree.start as usize..(tree.start + tree.len) as usize];
                let rows = acc.scores.chunks_exact_mut(w).zip(leaves);
                match list {
                    _ if tree.all && w == 2 => {
                        add_fixed::<T, 2>(&mut acc.scores, leaves, offset, weights)
                    }
                    _ if tree.all && w == 3 => {
                        add_fixed::<T, 3>(&mut acc.scores, leaves, offset, weights)
                    }
                    _ if tree.all && w == 4 => {
                        add_fixed::<T, 4>(&mut acc.scores, leaves, offset, weights)
                    }
                    _ if tree.all => {
                        for (row, &leaf) in rows {
                            let off = offset[leaf as usize] as usize;
                            for (s, v) in row.iter_mut().zip(&weights[off..off + w]) {
                                *s += *v;
                            }
                        }
                    }
                    [c] => {
                        let c = *c as usize;
                        for (row, &leaf) in rows {
                            row[c] += weights[offset[leaf as usize] as usize];
                        }
                    }
                    _ => {
                        for (row, &leaf) in rows {
                            let off = offset[leaf as usize] as usize;
                            for (&c, v) in list.iter().zip(&weights[off..off + list.len()]) {
                                row[c as usize] += *v;
                            }
                        }
                    }
                }
                if fixed.is_none() {
                    for (m, &leaf) in acc.masks.iter_mut().zip(leaves) {
                        *m |= mask[leaf as usize];
                    }
                }
            }
            Payload::Sparse {
                offset,
                len,
                weights,
            } => {
                for (r, &leaf) in leaves.iter().enumerate() {
                    let off = offset[leaf as usize] as usize;
                    let entries = &weights[off..off + len[leaf as usize] as usize];
                    let row = &mut acc.scores[r * w..(r + 1) * w];
                    let has = &mut acc.has[r * w..(r + 1) * w];
                    for &(c, v) in entries {
                        let c = c as usize;
                        match self.agg {
                            Agg::Sum | Agg::Average => row[c] += v,
                            Agg::Min => {
                                if !has[c] || v < row[c] {
                                    row[c] = v
                                }
                            }
                            Agg::Max => {
                                if !has[c] || v > row[c] {
                                    row[c] = v
                                }
                            }
                        }
                        has[c] = true;
                    }
                }
            }
        }
    }

    /// Leaves of tree `t` for each row of `xb`, written to `out` (one per row).
    fn walk_rows(&self, t: usize, xt: &[T], shift: u32, clean: bool, out: &mut [u32]) {
        let (root, sure, steps) = (self.roots[t], self.sure[t], self.depths[t]);
        if shift == SHIFT {
            self.dispatch(
                RowsJob::<T, SHIFT> {
                    root,
                    sure,
                    steps,
                    xt,
                    out,
                },
                clean,
            )
        } else {
            self.dispatch(
                RowsJob::<T, SHIFT_WIDE> {
                    root,
                    sure,
                    steps,
                    xt,
                    out,
                },
                clean,
            )
        }
    }

    /// Leaves of trees `t0..t0 + LANES` (those that exist) for one row.
    fn walk_trees(&self, t0: usize, row: &[T], clean: bool) -> [u32; LANES] {
        let mut roots = [0u32; LANES];
        let mut steps = 0;
        let mut sure = u32::MAX;
        let last = self.roots.len().saturating_sub(1);
        for (k, r) in roots.iter_mut().enumerate() {
            let t = (t0 + k).min(last);
            *r = self.roots[t];
            steps = steps.max(self.depths[t]);
            sure = sure.min(self.sure[t]);
        }
        let mut out = [0u32; LANES];
        self.dispatch(
            TreesJob {
                roots,
                sure,
                steps,
                row,
                out: &mut out,
            },
            clean,
        );
        out
    }

    /// Runs `job` with the forest's step kernel; `clean` says the rows it reads hold no NaN.
    fn dispatch<J: Job<T>>(&self, job: J, clean: bool) {
        let nodes = &self.nodes[..];
        match self.walk {
            Walk::Fast {
                lt: false,
                nan: NAN_PLANES,
            } => job.run(Fast::<T, false, NAN_NONE> { nodes }),
            Walk::Fast {
                lt: true,
                nan: NAN_PLANES,
            } => job.run(Fast::<T, true, NAN_NONE> { nodes }),
            Walk::Fast {
                lt: false,
                nan: NAN_MIXED,
            } if clean => job.run(Fast::<T, false, NAN_CLEAN> { nodes }),
            Walk::Fast {
                lt: true,
                nan: NAN_MIXED,
            } if clean => job.run(Fast::<T, true, NAN_CLEAN> { nodes }),
            Walk::Fast {
                lt: false,
                nan: NAN_NONE,
            } => job.run(Fast::<T, false, NAN_NONE> { nodes }),
            Walk::Fast {
                lt: false,
                nan: NAN_ALL,
            } => job.run(Fast::<T, false, NAN_ALL> { nodes }),
            Walk::Fast { lt: false, nan: _ } => job.run(Fast::<T, false, NAN_MIXED> { nodes }),
            Walk::Fast {
                lt: true,
                nan: NAN_NONE,
            } => job.run(Fast::<T, true, NAN_NONE> { nodes }),
            Walk::Fast {
                lt: true,
                nan: NAN_ALL,
            } => job.run(Fast::<T, true, NAN_ALL> { nodes }),
            Walk::Fast { lt: true, nan: _ } => job.run(Fast::<T, true, NAN_MIXED> { nodes }),
            Walk::General => job.run(General {
                nodes,
                conds: &self.conds,
                sets: &self.sets,
                values: &self.set_values,
            }),
        }
    }
}

impl Forest<f32> {
    /// The same ensemble in double precision (exact: every `f32` is a `f64`).
    pub fn widen(&self) -> Forest<f64> {
        let payload = match &self.payload {
            Payload::Single { value } => Payload::Single {
                value: value.iter().map(|v| *v as f64).collect(),
            },
            Payload::Dense {
                offset,
                mask,
                weights,
                trees,
                targets,
                fixed,
            } => Payload::Dense {
                offset: offset.clone(),
                mask: mask.clone(),
                weights: weights.iter().map(|v| *v as f64).collect(),
                trees: trees.clone(),
                targets: targets.clone(),
                fixed: *fixed,
            },
            Payload::Sparse {
                offset,
                len,
                weights,
            } => Payload::Sparse {
                offset: offset.clone(),
                len: len.clone(),
                weights: weights.iter().map(|(c, v)| (*c, *v as f64)).collect(),
            },
        };
        Forest {
            nodes: self
                .nodes
                .iter()
                .map(|n| Node {
                    feature: n.feature,
                    c: n.c,
                    threshold: n.threshold as f64,
                })
                .collect(),
            conds: self.conds.clone(),
            sets: self.sets.clone(),
            set_values: self.set_values.iter().map(|v| *v as f64).collect(),
            roots: self.roots.clone(),
            depths: self.depths.clone(),
            sure: self.sure.clone(),
            walk: self.walk,
            payload,
            n: self.n,
            agg: self.agg,
            max_feature: self.max_feature,
        }
    }
}

/// A value as the two NaN planes of [`NAN_PLANES`] see it.
#[inline]
fn nan_planes<T: Num>(v: T) -> [T; 2] {
    #[allow(clippy::eq_op)]
    if v != v {
        [T::from_f64(f64::NEG_INFINITY), T::from_f64(f64::INFINITY)]
    } else {
        [v, v]
    }
}

/// Whether [`NAN_PLANES`] routes NaN exactly like onnxruntime for every branch: -inf must
/// satisfy the normalised comparison where NaN goes to "a", +inf must fail it elsewhere.
fn planes_work(spec: &Spec, lt: bool) -> bool {
    spec.nodes.iter().all(|node| match *node {
        SpecNode::Branch {
            cond,
            threshold,
            missing_true,
            ..
        } => match fast_form(cond, missing_true) {
            Some((_, _, true)) => !threshold.is_nan() && !(lt && threshold == f64::NEG_INFINITY),
            Some((_, _, false)) => lt || threshold != f64::INFINITY,
            None => false,
        },
        SpecNode::Leaf { .. } => true,
    })
}

/// How a condition maps onto a fast kernel: `(uses <, swap children, NaN goes to a)`, or
/// `None` when it needs the general kernel.
fn fast_form(cond: Cond, missing_true: bool) -> Option<(bool, bool, bool)> {
    Some(match cond {
        // v <= t: true child; NaN: false unless tracked.
        Cond::Leq => (false, false, missing_true),
        Cond::Lt => (true, false, missing_true),
        // v >= t <=> !(v < t) for numbers: a = false child; NaN goes to the false child
        // (= a) unless tracked.
        Cond::Gte => (true, true, !missing_true),
        Cond::Gt => (false, true, !missing_true),
        _ => return None,
    })
}

/// Dense accumulation of `W` targets per leaf, all targets in order.
#[inline]
fn add_fixed<T: Num, const W: usize>(
    scores: &mut [T],
    leaves: &[u32],
    offset: &[u32],
    weights: &[T],
) {
    for (row, &leaf) in scores.chunks_exact_mut(W).zip(leaves) {
        let off = offset[leaf as usize] as usize;
        if let (Ok(row), Some(Ok(lw))) = (
            <&mut [T; W]>::try_from(row),
            weights.get(off..off + W).map(<&[T; W]>::try_from),
        ) {
            for j in 0..W {
                row[j] += lw[j];
            }
        }
    }
}

/// Per-call accumulators for a block of rows.
struct Acc<T> {
    width: usize,
    scores: Vec<T>,
    has: Vec<bool>,
    masks: Vec<u64>,
    dense: bool,
    fixed: Option<u64>,
    sparse: bool,
}

impl<T: Num> Acc<T> {
    fn new(payload: &Payload<T>, rows: usize, width: usize) -> Acc<T> {
        let sparse = matches!(payload, Payload::Sparse { .. });
        let dense = matches!(payload, Payload::Dense { .. });
        let fixed = match payload {
            Payload::Dense { fixed, .. } => *fixed,
            _ => None,
        };
        Acc {
            fixed,
            width,
            scores: vec![T::ZERO; rows * width],
            has: vec![false; if sparse { rows * width } else { 0 }],
            masks: vec![0; if dense { rows } else { 0 }],
            dense,
            sparse,
        }
    }

    fn reset(&mut self, rows: usize) {
        let n = rows * self.width;
        self.scores[..n].iter_mut().for_each(|s| *s = T::ZERO);
        if self.sparse {
            self.has[..n].iter_mut().for_each(|h| *h = false);
        }
        if self.dense {
            self.masks[..rows].iter_mut().for_each(|m| *m = 0);
        }
    }

    /// Row `r`'s scores with onnxruntime's "has score" flags.
    fn read(&self, r: usize, sv: &mut [Sv<T>], any_tree: bool) {
        let w = self.width;
        let scores = &self.scores[r * w..(r + 1) * w];
        for (c, (out, &score)) in sv.iter_mut().zip(scores).enumerate() {
            let has = if self.sparse {
                self.has[r * w + c]
            } else if self.dense {
                let m = self.fixed.unwrap_or(self.masks[r]);
                c < 64 && m & (1u64 << c) != 0
            } else {
                any_tree
            };
            *out = Sv { score, has };
        }
    }
}

/// Rejects cycles (shared subtrees are fine) and trees deeper than [`MAX_DEPTH`], by an
/// iterative depth-first walk from every root.
fn check_acyclic(spec: &Spec, what: &str) -> TractResult<()> {
    let count = spec.nodes.len();
    let mut state = vec![0u8; count];
    let mut depth = vec![0u32; count];
    let mut stack: Vec<(usize, bool)> = Vec::new();
    for (tree, &root) in spec.roots.iter().enumerate() {
        ensure!(
            root < count,
            "{what}: tree {tree} has root {root}, out of {count} nodes"
        );
        stack.push((root, false));
        while let Some((n, expanded)) = stack.pop() {
            let node = spec.nodes[n];
            if expanded {
                let d = match node {
                    SpecNode::Branch { t, f, .. } => 1 + depth[t].max(depth[f]),
                    SpecNode::Leaf { .. } => 0,
                };
                ensure!(
                    d <= MAX_DEPTH,
                    "{what}: tree {tree} is deeper than {MAX_DEPTH} levels"
                );
                depth[n] = d;
                state[n] = 2;
                continue;
            }
            match state[n] {
                2 => continue,
                1 => bail!("{what}: tree {tree} contains a cycle through node {n}"),
                _ => {}
            }
            state[n] = 1;
            stack.push((n, true));
            if let SpecNode::Branch { t, f, .. } = node {
                ensure!(
                    t < count && f < count,
                    "{what}: node {n} has a child out of {count} nodes"
                );
                stack.push((f, false));
                stack.push((t, false));
            }
        }
    }
    Ok(())
}

/// Per slot: the most and the fewest steps to a leaf.
fn slot_depths(slots: &[Slot], what: &str) -> TractResult<(Vec<u32>, Vec<u32>)> {
    let mut deep = vec![0u32; slots.len()];
    let mut shallow = vec![0u32; slots.len()];
    let mut done = vec![false; slots.len()];
    let mut stack: Vec<(u32, bool)> = Vec::new();
    let succ = |slot: Slot| -> [Option<u32>; 2] {
        match slot {
            Slot::Branch { c, .. } => [Some(c), Some(c + 1)],
            Slot::Jump { to } => [Some(to), None],
            Slot::Leaf { .. } => [None, None],
        }
    };
    for start in 0..slots.len() as u32 {
        if done[start as usize] {
            continue;
        }
        stack.push((start, false));
        while let Some((i, expanded)) = stack.pop() {
            let iu = i as usize;
            if done[iu] {
                continue;
            }
            let next = succ(slots[iu]);
            if expanded {
                let (mut d, mut s) = (0u32, u32::MAX);
                for j in next.into_iter().flatten() {
                    d = d.max(deep[j as usize] + 1);
                    s = s.min(shallow[j as usize] + 1);
                }
                ensure!(d <= 2 * MAX_DEPTH, "{what}: a tree is too deep");
                deep[iu] = d;
                shallow[iu] = if s == u32::MAX { 0 } else { s };
                done[iu] = true;
                continue;
            }
            stack.push((i, true));
            for j in next.into_iter().flatten() {
                if !done[j as usize] {
                    stack.push((j, false));
                }
            }
        }
    }
    Ok((deep, shallow))
}

fn build_payload<T: Num>(
    spec: &Spec,
    slots: &[Slot],
    roots: &[u32],
    what: &str,
) -> TractResult<Payload<T>> {
    // The weights of the leaf in slot i (none for branches and jumps).
    let leaf_weights = |i: usize| -> TractResult<&[(u32, f64)]> {
        let Some(Slot::Leaf { n }) = slots.get(i) else {
            return Ok(&[]);
        };
        match spec.nodes[*n] {
            SpecNode::Leaf { w_start, w_len, .. } => spec
                .weights
                .get(w_start..w_start.saturating_add(w_len))
                .ok_or_else(|| format_err!("{what}: leaf weights out of range")),
            SpecNode::Branch { .. } => Ok(&[]),
        }
    };
    for &(target, _) in &spec.weights {
        ensure!(
            (target as usize) < spec.n,
            "{what}: target/class id {target} is not below the count {}",
            spec.n
        );
    }
    if spec.n == 1 {
        // onnxruntime's one-target path adds the first weight of the leaf, or the node's own
        // value when the leaf has none.
        let mut value = vec![T::ZERO; slots.len()];
        for (i, slot) in slots.iter().enumerate() {
            if let Slot::Leaf { n } = *slot {
                if let SpecNode::Leaf { value: v, .. } = spec.nodes[n] {
                    value[i] = T::from_f64(leaf_weights(i)?.first().map_or(v, |w| w.1));
                }
            }
        }
        return Ok(Payload::Single { value });
    }
    if let Some(dense) = dense_payload(spec, slots, roots, &leaf_weights)? {
        return Ok(dense);
    }
    let mut offset = vec![0u32; slots.len()];
    let mut len = vec![0u32; slots.len()];
    let mut weights = Vec::new();
    for i in 0..slots.len() {
        let ws = leaf_weights(i)?;
        offset[i] = weights.len() as u32;
        len[i] = ws.len() as u32;
        weights.extend(ws.iter().map(|(c, v)| (*c, T::from_f64(*v))));
    }
    ensure!(
        weights.len() < u32::MAX as usize,
        "{what}: too many leaf weights"
    );
    Ok(Payload::Sparse {
        offset,
        len,
        weights,
    })
}

/// The dense layout, when it applies: sum/average, at most 64 targets, no leaf naming a
/// target twice, and leaves shared between trees seeing the same target list.
fn dense_payload<'s, T: Num>(
    spec: &'s Spec,
    slots: &[Slot],
    roots: &[u32],
    leaf_weights: &dyn Fn(usize) -> TractResult<&'s [(u32, f64)]>,
) -> TractResult<Option<Payload<T>>> {
    if !matches!(spec.agg, Agg::Sum | Agg::Average) || spec.n > 64 {
        return Ok(None);
    }
    let mut leaf_mask = vec![0u64; slots.len()];
    for i in 0..slots.len() {
        for &(c, _) in leaf_weights(i)? {
            let bit = 1u64 << c;
            if leaf_mask[i] & bit != 0 {
                return Ok(None);
            }
            leaf_mask[i] |= bit;
        }
    }
    // Per tree: the union of its reachable leaves' targets.
    let mut seen = vec![u32::MAX; slots.len()];
    let mut tree_mask = Vec::with_capacity(roots.len());
    let mut owner_mask: Vec<Option<u64>> = vec![None; slots.len()];
    let mut leaves_of: Vec<Vec<u32>> = Vec::with_capacity(roots.len());
    let mut stack = Vec::new();
    for (t, &root) in roots.iter().enumerate() {
        let mut m = 0u64;
        let mut leaves = Vec::new();
        stack.push(root);
        while let Some(i) = stack.pop() {
            let iu = i as usize;
            if seen[iu] == t as u32 {
                continue;
            }
            seen[iu] = t as u32;
            match slots[iu] {
                Slot::Leaf { .. } => {
                    m |= leaf_mask[iu];
                    leaves.push(i);
                }
                Slot::Branch { c, .. } => {
                    stack.push(c);
                    stack.push(c + 1);
                }
                Slot::Jump { to } => stack.push(to),
            }
        }
        for &l in &leaves {
            match owner_mask[l as usize] {
                Some(prev) if prev != m => return Ok(None),
                _ => owner_mask[l as usize] = Some(m),
            }
        }
        tree_mask.push(m);
        leaves_of.push(leaves);
    }
    let full = if spec.n == 64 {
        u64::MAX
    } else {
        (1u64 << spec.n) - 1
    };
    let mut targets = Vec::new();
    let mut trees = Vec::with_capacity(roots.len());
    for &m in &tree_mask {
        let start = targets.len() as u32;
        targets.extend((0..64u32).filter(|c| m & (1u64 << c) != 0));
        trees.push(DenseTree {
            start,
            len: targets.len() as u32 - start,
            all: m == full,
        });
    }
    let mut offset = vec![0u32; slots.len()];
    let mut weights: Vec<T> = Vec::new();
    let mut done = vec![false; slots.len()];
    for (t, leaves) in leaves_of.iter().enumerate() {
        let m = tree_mask[t];
        for &l in leaves {
            let l = l as usize;
            if done[l] {
                continue;
            }
            done[l] = true;
            offset[l] = weights.len() as u32;
            let at = weights.len();
            weights.extend((0..m.count_ones()).map(|_| T::ZERO));
            for &(c, v) in leaf_weights(l)? {
                // position of c among the set bits of m
                let pos = (m & ((1u64 << c) - 1)).count_ones() as usize;
                weights[at + pos] = T::from_f64(v);
            }
        }
    }
    if weights.len() >= u32::MAX as usize {
        return Ok(None);
    }
    // When every leaf holds every target of its tree, which targets a row has scores for
    // does not depend on the row.
    let uniform = leaves_of
        .iter()
        .zip(&tree_mask)
        .all(|(leaves, m)| leaves.iter().all(|l| leaf_mask[*l as usize] == *m));
    let fixed = uniform.then(|| tree_mask.iter().fold(0, |a, m| a | m));
    Ok(Some(Payload::Dense {
        offset,
        mask: leaf_mask,
        weights,
        trees,
        targets,
        fixed,
    }))
}

/// One traversal step: from node `i` to the next, reading feature `f` at
/// `x[(f << SHIFT) + lane]`.
trait Step<T>: Copy {
    fn next<const SHIFT: u32>(&self, i: u32, x: &[T], lane: usize) -> u32;
}

#[derive(Clone, Copy)]
struct Fast<'a, T, const LT: bool, const NAN: u8> {
    nodes: &'a [Node<T>],
}

impl<T: Num, const LT: bool, const NAN: u8> Step<T> for Fast<'_, T, LT, NAN> {
    // `!(v >= t)` is deliberate: it is `v < t` for numbers and true for NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    #[inline(always)]
    fn next<const SHIFT: u32>(&self, i: u32, x: &[T], lane: usize) -> u32 {
        let n = &self.nodes[i as usize];
        let feature = if NAN == NAN_MIXED || NAN == NAN_CLEAN {
            n.feature & FEATURE_MASK
        } else {
            n.feature
        };
        let v = x[((feature as usize) << SHIFT) + lane];
        let t = n.threshold;
        let go_a = match NAN {
            NAN_NONE | NAN_CLEAN => {
                if LT {
                    v < t
                } else {
                    v <= t
                }
            }
            NAN_ALL => {
                if LT {
                    !(v >= t)
                } else {
                    !(v > t)
                }
            }
            _ => {
                #[allow(clippy::eq_op)]
                let nan = v != v;
                let cmp = if LT { v < t } else { v <= t };
                cmp | (nan & (n.feature & FLAG != 0))
            }
        };
        n.c.wrapping_add(go_a as u32)
    }
}

#[derive(Clone, Copy)]
struct General<'a, T> {
    nodes: &'a [Node<T>],
    conds: &'a [u8],
    sets: &'a [(u32, u32)],
    values: &'a [T],
}

impl<T: Num> Step<T> for General<'_, T> {
    #[inline(always)]
    fn next<const SHIFT: u32>(&self, i: u32, x: &[T], lane: usize) -> u32 {
        let n = &self.nodes[i as usize];
        let v = x[(((n.feature & FEATURE_MASK) as usize) << SHIFT) + lane];
        let t = n.threshold;
        let hit = match self.conds[i as usize] {
            C_LEQ => v <= t,
            C_LT => v < t,
            C_GTE => v >= t,
            C_GT => v > t,
            C_EQ => v == t,
            C_NEQ => v != t,
            C_MEMBER => {
                let (s, l) = self.sets[i as usize];
                self.values[s as usize..(s + l) as usize].contains(&v)
            }
            _ => false,
        };
        #[allow(clippy::eq_op)]
        let nan = v != v;
        n.c.wrapping_add((hit || (nan && n.feature & FLAG != 0)) as u32)
    }
}

/// `K` traversals in lockstep: `sure` steps in which no lane can reach a leaf (the tree's
/// shortest path), then up to `steps` (its longest) until no lane moves. Lane `k` reads
/// `x[(f << SHIFT) + base + k]` when `ROWS` (lanes are rows of a feature-major block), else
/// `x[f]` (lanes are trees on one row).
#[inline(always)]
fn walk<T, S: Step<T>, const K: usize, const SHIFT: u32, const ROWS: bool>(
    s: S,
    mut idx: [u32; K],
    x: &[T],
    base: usize,
    sure: u32,
    steps: u32,
) -> [u32; K] {
    let lane = |k: usize| if ROWS { base + k } else { 0 };
    let sure = sure.min(steps);
    for _ in 0..sure {
        for k in 0..K {
            idx[k] = s.next::<SHIFT>(idx[k], x, lane(k));
        }
    }
    // Then check for progress every other step only.
    let mut left = steps - sure;
    while left > 0 {
        if left >= 2 {
            for k in 0..K {
                idx[k] = s.next::<SHIFT>(idx[k], x, lane(k));
            }
            left -= 1;
        }
        let mut moved = 0u32;
        for k in 0..K {
            let next = s.next::<SHIFT>(idx[k], x, lane(k));
            moved |= next ^ idx[k];
            idx[k] = next;
        }
        left -= 1;
        if moved == 0 {
            break;
        }
    }
    idx
}

/// A traversal job, run with whichever step kernel the forest uses.
trait Job<T> {
    fn run<S: Step<T>>(self, s: S);
}

/// One tree over the rows of a feature-major block (lanes are rows).
struct RowsJob<'a, T, const SHIFT: u32> {
    root: u32,
    sure: u32,
    steps: u32,
    xt: &'a [T],
    out: &'a mut [u32],
}

impl<T, const SHIFT: u32> Job<T> for RowsJob<'_, T, SHIFT> {
    #[inline]
    fn run<S: Step<T>>(self, s: S) {
        for (g, out) in self.out.chunks_mut(LANES).enumerate() {
            let leaves = walk::<T, S, LANES, SHIFT, true>(
                s,
                [self.root; LANES],
                self.xt,
                g * LANES,
                self.sure,
                self.steps,
            );
            let n = out.len();
            out.copy_from_slice(&leaves[..n]);
        }
    }
}

/// Several trees over one row (lanes are trees).
struct TreesJob<'a, T> {
    roots: [u32; LANES],
    sure: u32,
    steps: u32,
    row: &'a [T],
    out: &'a mut [u32; LANES],
}

impl<T> Job<T> for TreesJob<'_, T> {
    #[inline]
    fn run<S: Step<T>>(self, s: S) {
        *self.out =
            walk::<T, S, LANES, 0, false>(s, self.roots, self.row, 0, self.sure, self.steps);
    }
}
