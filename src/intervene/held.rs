//! Captures an engine holds where it made them ([`RunRequest::hold_captures`](crate::engine::RunRequest)),
//! so that a later call patches from them ([`Op::PatchHeld`](super::Op)) without a trip through
//! the host: the host data on the CPU, the call's capture arena on a device. A patching sweep
//! holds its sources' clean values this way (DESIGN.md section 1).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use super::Captured;
use crate::{Error, Result};

/// The captures of one call, held by the engine that made them. Cheap to clone (shared); the
/// memory is released when the last clone is dropped.
#[derive(Clone)]
pub struct Held {
    /// Per capture (request order): row width in floats and number of rows.
    shapes: Arc<[(usize, usize)]>,
    state: Arc<dyn Any + Send + Sync>,
}

impl Held {
    /// The captures `captured` of a call (their shapes; the data may be empty), held in an
    /// engine's `state`.
    pub fn new<S: Any + Send + Sync>(captured: &[Captured], state: S) -> Held {
        let shapes = captured.iter().map(|c| (c.token_shape.iter().product(), c.positions.iter().map(Vec::len).sum())).collect();
        Held { shapes, state: Arc::new(state) }
    }

    /// Host-held captures: the data itself (the CPU engine's).
    pub fn host(captured: &[Captured]) -> Held {
        Held::new(captured, HostHeld(captured.iter().map(|c| c.data.clone()).collect()))
    }

    /// The engine-specific state, when `S` is its type.
    pub fn state<S: Any>(&self) -> Option<&S> {
        self.state.downcast_ref()
    }

    /// (row width, rows) of capture `capture`.
    pub fn shape(&self, capture: usize) -> Option<(usize, usize)> {
        self.shapes.get(capture).copied()
    }

    /// Rows `rows` (indices into capture `capture`'s rows, prompt-major as in [`Captured`]) as
    /// patch values; an error for an index out of range.
    pub fn rows(&self, capture: usize, rows: Vec<usize>) -> Result<HeldRows> {
        let (_, n) = self.shape(capture).ok_or_else(|| Error::input(format!("held captures: capture {capture} is out of range ({} held)", self.shapes.len())))?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            return Err(Error::input(format!("held captures: row {bad} of capture {capture} is out of range ({n} rows)")));
        }
        Ok(HeldRows { held: self.clone(), capture, rows })
    }
}

/// The state of host-held captures: each capture's data, `[n_rows, width]`.
struct HostHeld(Vec<Vec<f32>>);

/// Whole rows of one held capture, used as patch values: row `k` patches the k-th selected
/// (prompt, position), or every one when there is a single row.
#[derive(Clone)]
pub struct HeldRows {
    pub held: Held,
    /// Index of the capture in its call.
    pub capture: usize,
    /// Row indices into the capture.
    pub rows: Vec<usize>,
}

impl HeldRows {
    /// Floats per row (the whole row of the captured site).
    pub fn width(&self) -> usize {
        self.held.shapes[self.capture].0
    }

    /// The rows' data when they are held on the host; None when a device holds them.
    pub fn host_data(&self) -> Option<&[f32]> {
        self.held.state::<HostHeld>().map(|h| h.0[self.capture].as_slice())
    }

    /// The same rows with `keep` selecting among them (indices into `rows`).
    pub fn select(&self, keep: impl IntoIterator<Item = usize>) -> HeldRows {
        HeldRows { held: self.held.clone(), capture: self.capture, rows: keep.into_iter().map(|k| self.rows[k]).collect() }
    }

    /// The rows' selected elements `slices` ((start, len) ranges of a row), row after row, from
    /// host-held rows; None when a device holds them.
    pub fn gather(&self, slices: &[(usize, usize)]) -> Option<Vec<f32>> {
        let data = self.host_data()?;
        let w = self.width();
        Some(self.rows.iter().flat_map(|&r| slices.iter().flat_map(move |&(a, n)| data[r * w + a..r * w + a + n].iter().copied())).collect())
    }
}

impl fmt::Debug for HeldRows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeldRows {{ capture: {}, rows: {:?}, width: {} }}", self.capture, self.rows, self.width())
    }
}

/// Held rows are equal when they are the same rows of the same held call.
impl PartialEq for HeldRows {
    fn eq(&self, other: &HeldRows) -> bool {
        Arc::ptr_eq(&self.held.state, &other.held.state) && self.capture == other.capture && self.rows == other.rows
    }
}
