//! The evaluation core of the tree ensembles: a validated [`Spec`] is flattened once into
//! compact node arrays ([`Forest`]), which score rows in blocks, several traversals in
//! lockstep, with no allocation beyond a per-call scratch.
//!
//! Layout: every node, leaves included, is a [`Node`] `{feature, c, threshold}` (12 bytes
//! for `f32` thresholds), trees laid out breadth first with a branch's two children in
//! adjacent slots, so a step is `c + (comparison holds)`: no select, no second load. A
//! leaf has a NaN threshold and points to itself, so a traversal is simply "step up to
//! `depth` times" and needs no per-lane leaf test; a lane that reached its leaf stays
//! there, and a group stops early once no lane moved. Subtrees shared by several parents
//! (allowed, cycles are not) are laid out once and reached through one-step jump slots.
//!
//! Evaluation: rows are scored in blocks of 128, stored feature-major, tree by tree (the
//! tree stays in cache), 8 rows walking a tree in lockstep so their memory latencies
//! overlap; for fewer than 8 rows the lanes are 8 trees on the same row instead.
//!
//! Comparison kernels: when every branch is `<=`/`<`/`>=`/`>` the nodes are normalised to
//! one operator (`v <= t` or `v < t` selects side "a"; `>=`/`>` swap the children), and a
//! NaN input goes to "a" or "b" per node: never, always (`!(v > t)` is one comparison), or
//! mixed — then resolved in the data (each feature given twice, NaN as -inf or as NaN, the
//! node reading the copy that routes NaN its way), falling back to a per-node flag in the
//! rare cases (NaN or infinite thresholds) where that would not be exact. Anything else
//! (`==`, `!=`, set membership, `<=` mixed with `<`) uses the masked kernel: a per-node
//! truth table over the comparison's outcome (less, greater, equal, unordered), and for set
//! membership a bit set over a per-feature dictionary of category values (chains of `==`
//! nodes that converters emit for categorical splits are merged into such sets first). A
//! literal transcription of onnxruntime's per-node rules covers the leftovers (NaN thresholds
//! with missing-value tracking).
//!
//! Accumulation follows onnxruntime's order exactly (trees in order, a leaf's weights in
//! attribute order) in the threshold precision `T`: `f32` for float/integer inputs, `f64`
//! for double inputs or double attributes; single-threaded onnxruntime gives bit-identical
//! results.

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
/// Feature ids are stored in the low 31 bits of [`Node::feature`]; the top bit is a flag
/// (the masked kernel uses the top byte for its truth table instead).
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
    /// A category code (a small non-negative integer value) back as an integer.
    fn to_code(self) -> u32;
    /// Bits of the type, which can carry a small set's bit mask in a threshold slot.
    const BITS: u32;
    fn to_bits64(self) -> u64;
    fn from_bits64(bits: u64) -> Self;
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
    const BITS: u32 = 32;
    #[inline(always)]
    fn to_bits64(self) -> u64 {
        self.to_bits() as u64
    }
    fn from_bits64(bits: u64) -> f32 {
        f32::from_bits(bits as u32)
    }
    #[inline(always)]
    fn to_code(self) -> u32 {
        self as u32
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
    const BITS: u32 = 64;
    #[inline(always)]
    fn to_bits64(self) -> u64 {
        self.to_bits()
    }
    fn from_bits64(bits: u64) -> f64 {
        f64::from_bits(bits)
    }
    #[inline(always)]
    fn to_code(self) -> u32 {
        self as u32
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
    /// "missing value tracks true" for the general one; the masked kernel keeps its truth
    /// table in the top byte. With two planes per feature, the index is `2f + plane`.
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
/// -inf (plane 0: `v <= t`/`v < t` hold, the walk goes to "a") and as it is (plane 1: no
/// comparison with NaN holds), and each node reads feature `2f + plane`. The plain kernel
/// then suffices.
const NAN_PLANES: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walk {
    /// `v < t` (`lt`) or `v <= t` selects `a`; NaN per `nan`.
    Fast { lt: bool, nan: u8 },
    /// Any conditions, decided per node from a truth table over the comparison's outcome
    /// (`member`: some nodes test set membership, reading a category-code plane; `inline`:
    /// every bit set fits in a threshold slot, which then holds it).
    Masked { member: bool, inline: bool },
    /// Any conditions, onnxruntime's per-node rules literally (NaN thresholds with missing
    /// value tracking, which the truth table cannot express).
    General,
}

/// Truth-table bits of the masked kernel, indexed by the outcome of comparing the value to
/// the threshold: unordered (NaN; the bit also says "missing value tracks true"), less,
/// greater, equal. Set membership is tested separately.
const M_NAN: u8 = 1;
const M_LT: u8 = 2;
const M_GT: u8 = 4;
const M_EQ: u8 = 8;
/// Membership in a set of dictionary codes, held as a 64-bit mask in the node's set entry
/// (or its threshold slot).
const M_MEMBER: u8 = 16;
/// Membership in a list of values, scanned.
const M_LIST: u8 = 32;
/// The masked kernel keeps its table in the feature word's top byte: features below this.
const MASKED_FEATURES: u32 = 1 << 24;

/// The masked kernel's table for a condition.
fn cond_mask(cond: Cond, missing_true: bool) -> u8 {
    let base = match cond {
        Cond::Leq => M_LT | M_EQ,
        Cond::Lt => M_LT,
        Cond::Gte => M_GT | M_EQ,
        Cond::Gt => M_GT,
        Cond::Eq => M_EQ,
        // NaN != t holds
        Cond::Neq => M_LT | M_GT | M_NAN,
        Cond::Member { .. } => M_LIST,
    };
    base | if missing_true { M_NAN } else { 0 }
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
    /// General and masked kernels: condition code (or truth table) and member-set range or
    /// bit set per node.
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
    /// Per feature, the category dictionary of the masked kernel's bit-set members.
    dicts: Vec<Vec<T>>,
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
        let merged = merge_eq_chains(spec);
        let spec = merged.as_ref().unwrap_or(spec);

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
        // Per feature, the distinct values its membership tests name (at most 64): the
        // category dictionary a value is coded against.
        let dicts = member_dicts(spec);
        let walk = if other || (le && lt) {
            // With a NaN threshold every comparison is unordered, as for a NaN value: the
            // table cannot tell "missing value tracks true" from "the value is NaN".
            let ambiguous = spec.nodes.iter().any(|node| {
                matches!(*node, SpecNode::Branch { cond, threshold, missing_true: true, .. }
                    if threshold.is_nan() && !matches!(cond, Cond::Neq | Cond::Member { .. }))
            });
            if ambiguous {
                Walk::General
            } else {
                let member = spec.nodes.iter().any(|n| {
                    matches!(
                        n,
                        SpecNode::Branch {
                            cond: Cond::Member { .. },
                            ..
                        }
                    )
                });
                // the mask byte shares the feature word; member bit sets live in the
                // threshold slot when they fit
                let mut inline = true;
                let mut narrow = true;
                for node in &spec.nodes {
                    if let SpecNode::Branch { cond, feature, .. } = *node {
                        narrow &= (feature as u64) * 2 + 1 < MASKED_FEATURES as u64;
                        if let Cond::Member { .. } = cond {
                            let bits = member_bits(&dicts, spec, cond, feature);
                            inline &= bits.is_some_and(|b| T::BITS == 64 || b >> 32 == 0);
                        }
                    }
                }
                if narrow {
                    Walk::Masked { member, inline }
                } else {
                    Walk::General
                }
            }
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
        let general = matches!(walk, Walk::General | Walk::Masked { .. });
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
        let leaf_code = if matches!(walk, Walk::Masked { .. }) {
            0
        } else {
            C_LEAF
        };
        for (i, slot) in slots.iter().enumerate() {
            let i = i as u32;
            let (node, code, set) = match *slot {
                Slot::Leaf { .. } => (
                    Node {
                        feature: 0,
                        c: stay(i),
                        threshold: T::from_f64(f64::NAN),
                    },
                    leaf_code,
                    (0, 0),
                ),
                Slot::Jump { to } => (
                    Node {
                        feature: 0,
                        c: stay(to),
                        threshold: T::from_f64(f64::NAN),
                    },
                    leaf_code,
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
                        walk == Walk::General && missing_true
                    } else {
                        mixed && goes_a
                    };
                    let bits = member_bits(&dicts, spec, cond, feature);
                    let word = if planes {
                        2 * feature + u32::from(!goes_a)
                    } else if matches!(walk, Walk::Masked { member: true, .. }) {
                        // bit-set members read the category code plane
                        2 * feature + u32::from(bits.is_some())
                    } else {
                        feature | if flag { FLAG } else { 0 }
                    };
                    let node = Node {
                        feature: word,
                        c,
                        threshold: T::from_f64(threshold),
                    };
                    let (code, set) = match cond {
                        _ if matches!(walk, Walk::Masked { .. })
                            && !matches!(cond, Cond::Member { .. }) =>
                        {
                            (cond_mask(cond, missing_true), (0, 0))
                        }
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
                            match bits {
                                Some(bits) if matches!(walk, Walk::Masked { .. }) => {
                                    let code = M_MEMBER | (cond_mask(cond, missing_true) & M_NAN);
                                    (code, (bits as u32, (bits >> 32) as u32))
                                }
                                _ => {
                                    let at = set_values.len() as u32;
                                    set_values.extend(values.iter().map(|v| T::from_f64(*v)));
                                    let code = if matches!(walk, Walk::Masked { .. }) {
                                        cond_mask(cond, missing_true)
                                    } else {
                                        C_MEMBER
                                    };
                                    (code, (at, len as u32))
                                }
                            }
                        }
                    };
                    (node, code, set)
                }
            };
            let mut node = node;
            if let Walk::Masked { inline, .. } = walk {
                // the truth table rides in the feature word's top byte
                node.feature = (node.feature & (MASKED_FEATURES - 1)) | (code as u32) << 24;
                if inline && code & M_MEMBER != 0 {
                    node.threshold = T::from_bits64((set.1 as u64) << 32 | set.0 as u64);
                }
            }
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
            dicts: dicts
                .iter()
                .map(|d| d.iter().flatten().map(|v| T::from_f64(*v)).collect())
                .collect(),
        })
    }

    /// The category code of value `v` of feature `f` for set-membership nodes: its index in
    /// the feature's dictionary, 64 when absent, 65 for NaN.
    #[inline]
    fn code(&self, f: usize, v: T) -> T {
        #[allow(clippy::eq_op)]
        let code = if v != v {
            65
        } else {
            self.dicts
                .get(f)
                .and_then(|d| {
                    d.binary_search_by(|e| e.partial_cmp(&v).unwrap_or(std::cmp::Ordering::Less))
                        .ok()
                })
                .unwrap_or(64)
        };
        T::from_usize(code)
    }

    /// Which traversal kernel the forest uses (for tests).
    #[cfg(test)]
    pub fn kernel(&self) -> &'static str {
        match self.walk {
            Walk::General => "general",
            Walk::Masked { .. } => "masked",
            Walk::Fast { nan: NAN_NONE, .. } => "fast",
            Walk::Fast { nan: NAN_ALL, .. } => "fast, NaN to a",
            Walk::Fast {
                nan: NAN_PLANES, ..
            } => "fast, NaN planes",
            Walk::Fast { .. } => "fast, NaN flags",
        }
    }

    /// How many laid-out nodes test set membership (for tests).
    #[cfg(test)]
    pub fn member_nodes(&self) -> usize {
        match self.walk {
            Walk::Masked { .. } => self
                .conds
                .iter()
                .filter(|m| *m & (M_MEMBER | M_LIST) != 0)
                .count(),
            Walk::General => self.conds.iter().filter(|c| **c == C_MEMBER).count(),
            Walk::Fast { .. } => 0,
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
        // Rows per block: the stride 1 << shift, fewer when there are many targets, to
        // bound the accumulators.
        let block = if rows < LANES {
            1
        } else {
            let cap = ((1usize << 20) / width_acc.max(1)) / LANES * LANES;
            (1usize << shift).min(cap.max(LANES))
        };
        let mut acc = Acc::new(&self.payload, block, width_acc);
        // Forests whose nodes read two planes per feature, and how a value splits.
        let codes = matches!(self.walk, Walk::Masked { member: true, .. });
        let nan = matches!(
            self.walk,
            Walk::Fast {
                nan: NAN_PLANES,
                ..
            }
        );
        let split = |f: usize, v: T| -> [T; 2] {
            if codes {
                [v, self.code(f, v)]
            } else {
                nan_planes(v)
            }
        };
        let planes = codes || nan;
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
                    doubled.extend(row.iter().enumerate().flat_map(|(f, v)| split(f, *v)));
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
        let mut xt = vec![T::ZERO; (width << shift) * if planes { 2 } else { 1 }];
        let mut start = 0;
        while start < rows {
            let nb = block.min(rows - start);
            let xb = &x[start * width..(start + nb) * width];
            for (r, row) in xb.chunks_exact(width.max(1)).enumerate() {
                if planes {
                    for (f, v) in row.iter().enumerate() {
                        let [lo, hi] = split(f, *v);
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
            Walk::Masked { member: false, .. } => job.run(Masked::<T, false, false> {
                nodes,
                sets: &self.sets,
                values: &self.set_values,
            }),
            Walk::Masked {
                member: true,
                inline: false,
            } => job.run(Masked::<T, true, false> {
                nodes,
                sets: &self.sets,
                values: &self.set_values,
            }),
            Walk::Masked {
                member: true,
                inline: true,
            } => job.run(Masked::<T, true, true> {
                nodes,
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
                .map(|n| {
                    let inline_set = matches!(self.walk, Walk::Masked { inline: true, .. })
                        && (n.feature >> 24) & M_MEMBER as u32 != 0;
                    Node {
                        feature: n.feature,
                        c: n.c,
                        threshold: if inline_set {
                            f64::from_bits(n.threshold.to_bits() as u64)
                        } else {
                            n.threshold as f64
                        },
                    }
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
            dicts: self
                .dicts
                .iter()
                .map(|d| d.iter().map(|v| *v as f64).collect())
                .collect(),
        }
    }
}

/// A value as the two NaN planes of [`NAN_PLANES`] see it.
#[inline]
fn nan_planes<T: Num>(v: T) -> [T; 2] {
    #[allow(clippy::eq_op)]
    if v != v {
        [T::from_f64(f64::NEG_INFINITY), v]
    } else {
        [v, v]
    }
}

/// Whether [`NAN_PLANES`] routes NaN exactly like onnxruntime for every branch: -inf must
/// satisfy the normalised comparison where NaN goes to "a" (elsewhere NaN itself fails it).
fn planes_work(spec: &Spec, lt: bool) -> bool {
    spec.nodes.iter().all(|node| match *node {
        SpecNode::Branch {
            cond,
            threshold,
            missing_true,
            ..
        } => match fast_form(cond, missing_true) {
            Some((_, _, true)) => !(threshold.is_nan() || (lt && threshold == f64::NEG_INFINITY)),
            Some((_, _, false)) => true,
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

/// Per feature, the sorted distinct values of its membership tests, when there are at most
/// 64 (NaN, which no value equals, left out; `-0.0` and `0.0` are one value).
fn member_dicts(spec: &Spec) -> Vec<Option<Vec<f64>>> {
    let mut dicts: Vec<Option<Vec<f64>>> = Vec::new();
    for node in &spec.nodes {
        if let SpecNode::Branch {
            cond: Cond::Member { start, len },
            feature,
            ..
        } = *node
        {
            let f = feature as usize;
            if dicts.len() <= f {
                dicts.resize(f + 1, Some(Vec::new()));
            }
            let values = spec
                .sets
                .get(start..start.saturating_add(len))
                .unwrap_or(&[]);
            if let Some(d) = &mut dicts[f] {
                d.extend(values.iter().filter(|v| !v.is_nan()).map(|v| {
                    if *v == 0.0 {
                        0.0
                    } else {
                        *v
                    }
                }));
            }
        }
    }
    for d in dicts.iter_mut() {
        if let Some(values) = d {
            values.sort_by(f64::total_cmp);
            values.dedup();
            if values.len() > 64 {
                *d = None;
            }
        }
    }
    dicts
}

/// A membership test's set as a mask over its feature's dictionary, if it has one.
fn member_bits(dicts: &[Option<Vec<f64>>], spec: &Spec, cond: Cond, feature: u32) -> Option<u64> {
    let Cond::Member { start, len } = cond else {
        return None;
    };
    let dict = dicts.get(feature as usize)?.as_ref()?;
    let mut bits = 0u64;
    for v in spec.sets.get(start..start.saturating_add(len))? {
        if v.is_nan() {
            continue;
        }
        let at = dict
            .binary_search_by(|e| e.total_cmp(&if *v == 0.0 { 0.0 } else { *v }))
            .ok()?;
        bits |= 1u64 << at;
    }
    Some(bits)
}

/// Chains of `==` nodes on one feature that share their true child (how converters write a
/// categorical split: "x == 3, else x == 7, else ...") become one set-membership node at the
/// chain's head. Exact: the chain goes to its true child iff the value equals one of the
/// thresholds, or is NaN and some node of the chain tracks missing values to true. Nodes
/// inside a chain stay as they were for any other parent. `None` when there is no chain.
fn merge_eq_chains(spec: &Spec) -> Option<Spec> {
    let next_in_chain = |n: usize| -> Option<usize> {
        let SpecNode::Branch {
            cond: Cond::Eq,
            feature,
            t,
            f,
            ..
        } = spec.nodes[n]
        else {
            return None;
        };
        match spec.nodes.get(f) {
            Some(SpecNode::Branch {
                cond: Cond::Eq,
                feature: g,
                t: u,
                ..
            }) if *g == feature && *u == t => Some(f),
            _ => None,
        }
    };
    let mut inner = vec![false; spec.nodes.len()];
    let mut any = false;
    for n in 0..spec.nodes.len() {
        if let Some(f) = next_in_chain(n) {
            inner[f] = true;
            any = true;
        }
    }
    if !any {
        return None;
    }
    let mut out = spec.clone();
    for (head, &is_inner) in inner.iter().enumerate() {
        if is_inner || next_in_chain(head).is_none() {
            continue;
        }
        let SpecNode::Branch { feature, t, .. } = spec.nodes[head] else {
            continue;
        };
        let start = out.sets.len();
        let mut tracked = false;
        let mut at = head;
        let mut last_false = head;
        // The spec is acyclic, so the chain ends; the bound is a second guard.
        for _ in 0..spec.nodes.len() {
            let SpecNode::Branch {
                threshold,
                missing_true,
                f,
                ..
            } = spec.nodes[at]
            else {
                break;
            };
            out.sets.push(threshold);
            tracked |= missing_true;
            last_false = f;
            match next_in_chain(at) {
                Some(next) => at = next,
                None => break,
            }
        }
        out.nodes[head] = SpecNode::Branch {
            cond: Cond::Member {
                start,
                len: out.sets.len() - start,
            },
            feature,
            threshold: 0.0,
            missing_true: tracked,
            t,
            f: last_false,
        };
    }
    Some(out)
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
    for (i, m) in leaf_mask.iter_mut().enumerate() {
        for &(c, _) in leaf_weights(i)? {
            let bit = 1u64 << c;
            if *m & bit != 0 {
                return Ok(None);
            }
            *m |= bit;
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

#[derive(Clone, Copy)]
struct Masked<'a, T, const MEMBER: bool, const INLINE: bool> {
    nodes: &'a [Node<T>],
    sets: &'a [(u32, u32)],
    values: &'a [T],
}

impl<T: Num, const MEMBER: bool, const INLINE: bool> Step<T> for Masked<'_, T, MEMBER, INLINE> {
    #[inline(always)]
    fn next<const SHIFT: u32>(&self, i: u32, x: &[T], lane: usize) -> u32 {
        let n = &self.nodes[i as usize];
        let m = n.feature >> 24;
        let v = x[(((n.feature & (MASKED_FEATURES - 1)) as usize) << SHIFT) + lane];
        let t = n.threshold;
        // outcome: 0 unordered, 1 less, 2 greater, 3 equal
        let outcome = match v.partial_cmp(&t) {
            None => 0,
            Some(std::cmp::Ordering::Less) => 1,
            Some(std::cmp::Ordering::Greater) => 2,
            Some(std::cmp::Ordering::Equal) => 3,
        };
        let mut hit = (m >> outcome) & 1 != 0;
        if MEMBER {
            // bit-set members read the category code: 0..64, 64 other values, 65 NaN
            let bits = if INLINE {
                t.to_bits64()
            } else {
                let (lo, hi) = self.sets[i as usize];
                (hi as u64) << 32 | lo as u64
            };
            let code = v.to_code();
            let member = (((bits >> (code & 63)) & 1 != 0) & (code < 64))
                | ((code == 65) & (m & M_NAN as u32 != 0));
            hit = if m & M_MEMBER as u32 != 0 {
                member
            } else {
                hit
            };
            if m & M_LIST as u32 != 0 {
                let (s, l) = self.sets[i as usize];
                #[allow(clippy::eq_op)]
                let nan = v != v;
                hit = self.values[s as usize..(s + l) as usize].contains(&v)
                    | (nan & (m & M_NAN as u32 != 0));
            }
        }
        n.c.wrapping_add(hit as u32)
    }
}

/// Runs `$body` for each of the [`LANES`] lanes with `$k` a constant, so the lane state
/// stays in registers whatever the size of the step kernel.
macro_rules! each_lane {
    ($k:ident => $body:block) => {{
        const _: () = assert!(LANES == 8);
        {
            let $k = 0usize;
            $body
        }
        {
            let $k = 1usize;
            $body
        }
        {
            let $k = 2usize;
            $body
        }
        {
            let $k = 3usize;
            $body
        }
        {
            let $k = 4usize;
            $body
        }
        {
            let $k = 5usize;
            $body
        }
        {
            let $k = 6usize;
            $body
        }
        {
            let $k = 7usize;
            $body
        }
    }};
}

/// [`LANES`] traversals in lockstep: `sure` steps in which no lane can reach a leaf (the
/// tree's shortest path), then up to `steps` (its longest) until no lane moves. Lane `k`
/// reads `x[(f << SHIFT) + base + k]` when `ROWS` (lanes are rows of a feature-major block),
/// else `x[f]` (lanes are trees on one row).
#[inline(always)]
fn walk<T, S: Step<T>, const SHIFT: u32, const ROWS: bool>(
    s: S,
    mut idx: [u32; LANES],
    x: &[T],
    base: usize,
    sure: u32,
    steps: u32,
) -> [u32; LANES] {
    let lane = |k: usize| if ROWS { base + k } else { 0 };
    let sure = sure.min(steps);
    for _ in 0..sure {
        each_lane!(k => {
            idx[k] = s.next::<SHIFT>(idx[k], x, lane(k));
        });
    }
    // Then check for progress every other step only.
    let mut left = steps - sure;
    while left > 0 {
        if left >= 2 {
            each_lane!(k => {
                idx[k] = s.next::<SHIFT>(idx[k], x, lane(k));
            });
            left -= 1;
        }
        let mut moved = 0u32;
        each_lane!(k => {
            let next = s.next::<SHIFT>(idx[k], x, lane(k));
            moved |= next ^ idx[k];
            idx[k] = next;
        });
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
            let leaves = walk::<T, S, SHIFT, true>(
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
        *self.out = walk::<T, S, 0, false>(s, self.roots, self.row, 0, self.sure, self.steps);
    }
}
