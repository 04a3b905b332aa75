//! The `Tensor` handle: shared storage, a layout, and (when it takes part in autograd) a graph
//! node or a leaf gradient slot.

use crate::alloc::Buffer;
use crate::autograd::{self, GradFn, Node};
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::layout::Layout;
use crate::shape::{Dim, Shape};
use crate::storage::Storage;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Unique identity of a tensor handle (shared by its clones, not by its views).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// An n-dimensional array on a device, cheap to clone (an `Arc`), with autograd support.
///
/// Views (reshape, transpose, narrow, broadcast, ...) share storage with their source. A tensor
/// either is a *leaf* (created by the user; it may `requires_grad` and then accumulates its
/// gradient in [`Tensor::grad`]) or the result of an op that recorded a graph node because one
/// of its inputs required grad while grad mode was on.
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<TensorImpl>);

pub(crate) struct TensorImpl {
    pub(crate) id: TensorId,
    pub(crate) storage: Arc<RwLock<Storage>>,
    pub(crate) layout: Layout,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    /// Leaf flag; for op results this is true iff `node` is set.
    pub(crate) requires_grad: AtomicBool,
    pub(crate) node: Option<Arc<Node>>,
    /// Accumulated gradient of a leaf.
    pub(crate) grad: Mutex<Option<Tensor>>,
}

impl Drop for TensorImpl {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            autograd::drop_node_iteratively(node);
        }
    }
}

impl Tensor {
    /// This graph tensor (an op result) without its values: the same id, shape, dtype and graph
    /// node over an empty storage. Nodes hold it for inputs whose values no backward rule
    /// reads (see [`GradFn::reads_input`](crate::GradFn::reads_input)).
    pub(crate) fn value_free_handle(&self) -> Tensor {
        debug_assert!(
            self.0.node.is_some(),
            "only op results have value-free handles"
        );
        Tensor(Arc::new(TensorImpl {
            id: self.0.id,
            storage: Arc::new(RwLock::new(Storage::empty(self.0.dtype))),
            layout: self.0.layout.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            requires_grad: AtomicBool::new(self.0.requires_grad.load(Ordering::Relaxed)),
            node: self.0.node.clone(),
            grad: Mutex::new(None),
        }))
    }

    // ------------------------------------------------------------------ construction

    /// A leaf tensor over `storage` viewed through `layout`.
    pub fn from_storage(storage: Storage, layout: Layout) -> Tensor {
        assert!(
            layout.required_len() <= storage.len(),
            "from_storage: layout of shape {} needs {} elements, storage has {}",
            layout.shape(),
            layout.required_len(),
            storage.len()
        );
        Self::from_shared_storage(Arc::new(RwLock::new(storage)), layout)
    }

    pub(crate) fn from_shared_storage(storage: Arc<RwLock<Storage>>, layout: Layout) -> Tensor {
        let dtype = storage.read().unwrap().dtype();
        Tensor(Arc::new(TensorImpl {
            id: TensorId::next(),
            storage,
            layout,
            dtype,
            device: Device::Cpu,
            requires_grad: AtomicBool::new(false),
            node: None,
            grad: Mutex::new(None),
        }))
    }

    /// A contiguous tensor owning `buf`, with `shape`.
    pub fn from_buffer<T: Element>(buf: Buffer<T>, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        assert_eq!(
            buf.len(),
            shape.elem_count(),
            "from_buffer: {} elements do not fill shape {shape}",
            buf.len()
        );
        Self::from_storage(T::into_storage(buf), Layout::contiguous(shape))
    }

    /// A tensor of `shape` holding a copy of `data` (row-major).
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        assert_eq!(
            data.len(),
            shape.elem_count(),
            "from_slice: {} elements do not fill shape {shape}",
            data.len()
        );
        Self::from_buffer(Buffer::from_slice(data), shape)
    }

    /// A tensor of `shape` from `data` (row-major).
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        assert_eq!(
            data.len(),
            shape.elem_count(),
            "from_vec: {} elements do not fill shape {shape}",
            data.len()
        );
        Self::from_slice(&data, shape)
    }

    /// A rank-0 tensor holding `value`.
    pub fn scalar<T: Element>(value: T) -> Tensor {
        Self::from_buffer(Buffer::filled(1, value), Shape::scalar())
    }

    /// A tensor of `shape` filled with `value`, of the dtype of `value`.
    pub fn full<T: Element>(shape: impl Into<Shape>, value: T) -> Tensor {
        let shape = shape.into();
        Self::from_buffer(Buffer::filled(shape.elem_count(), value), shape)
    }

    /// An f32 tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>) -> Tensor {
        Self::full(shape, 0f32)
    }

    /// An f32 tensor of ones.
    pub fn ones(shape: impl Into<Shape>) -> Tensor {
        Self::full(shape, 1f32)
    }

    /// A tensor of zeros of the given dtype.
    pub fn zeros_dtype(shape: impl Into<Shape>, dtype: DType) -> Tensor {
        Self::full(shape, 0f64).to_dtype(dtype)
    }

    /// Zeros with this tensor's shape and dtype.
    pub fn zeros_like(&self) -> Tensor {
        Self::full_like(self, 0.0)
    }

    /// Ones with this tensor's shape and dtype.
    pub fn ones_like(&self) -> Tensor {
        Self::full_like(self, 1.0)
    }

    /// `value` (converted to this dtype) with this tensor's shape and dtype.
    pub fn full_like(&self, value: f64) -> Tensor {
        let n = self.elem_count();
        let storage = match self.dtype() {
            DType::F32 => Storage::F32(Buffer::filled(n, value as f32)),
            DType::F64 => Storage::F64(Buffer::filled(n, value)),
            DType::I64 => Storage::I64(Buffer::filled(n, value as i64)),
            DType::U32 => Storage::U32(Buffer::filled(n, value as u32)),
        };
        Self::from_storage(storage, Layout::contiguous(self.shape().clone()))
    }

    /// `[start, start + step, ...)` up to `end` (exclusive), as f32.
    pub fn arange(start: f32, end: f32, step: f32) -> Tensor {
        assert!(
            step != 0.0 && step.is_finite(),
            "arange: step must be finite and non-zero, got {step}"
        );
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        Self::from_buffer(Buffer::from_fn(n, |i| start + i as f32 * step), n)
    }

    /// `[start, start + step, ...)` up to `end` (exclusive), as i64.
    pub fn arange_i64(start: i64, end: i64, step: i64) -> Tensor {
        assert!(step != 0, "arange_i64: step must be non-zero");
        let n = if (step > 0 && end > start) || (step < 0 && end < start) {
            ((end - start).unsigned_abs()).div_ceil(step.unsigned_abs()) as usize
        } else {
            0
        };
        Self::from_buffer(Buffer::from_fn(n, |i| start + i as i64 * step), n)
    }

    /// `steps` evenly spaced f32 values from `start` to `end` inclusive.
    pub fn linspace(start: f32, end: f32, steps: usize) -> Tensor {
        let step = if steps > 1 {
            (end - start) as f64 / (steps - 1) as f64
        } else {
            0.0
        };
        Self::from_buffer(
            Buffer::from_fn(steps, |i| {
                if i + 1 == steps && steps > 1 {
                    end
                } else {
                    (start as f64 + i as f64 * step) as f32
                }
            }),
            steps,
        )
    }

    /// The n × n identity matrix in f32.
    pub fn eye(n: usize) -> Tensor {
        Self::from_buffer(
            Buffer::from_fn(n * n, |i| if i / n == i % n { 1f32 } else { 0f32 }),
            [n, n],
        )
    }

    // ------------------------------------------------------------------ accessors

    /// Identity of this handle (shared by clones).
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    /// The layout (shape, strides, offset).
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        self.0.layout.shape()
    }

    /// The dims as a slice.
    pub fn dims(&self) -> &[usize] {
        self.0.layout.dims()
    }

    /// Size of dim `d` (negative counts from the end).
    pub fn dim(&self, d: impl Dim) -> usize {
        self.dims()[d.resolve(self.rank(), "dim")]
    }

    /// Number of dims.
    pub fn rank(&self) -> usize {
        self.shape().rank()
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape().elem_count()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        self.0.device
    }

    /// True when the view is row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }

    /// Read access to the storage (shared with every view of it).
    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read().unwrap()
    }

    /// Write access to the storage; every view of it sees the change. Autograd does not track
    /// writes: use only on leaves (parameter updates) or outside of graph recording.
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write().unwrap()
    }

    /// True when both handles view the same storage buffer.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// The elements in row-major order as a `Vec<T>`; panics if `T` is not the dtype.
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        let storage = self.storage();
        let data = T::slice(&storage).unwrap_or_else(|| {
            panic!(
                "to_vec: tensor has dtype {}, asked for {}",
                self.dtype(),
                T::DTYPE
            )
        });
        match self.layout().contiguous_range() {
            Some(r) => data[r].to_vec(),
            None => self.layout().offsets().map(|o| data[o]).collect(),
        }
    }

    /// The elements as f64 in row-major order, whatever the dtype.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let storage = self.storage();
        crate::with_storage!(&*storage, |b: T| self
            .layout()
            .offsets()
            .map(|o| b[o].to_f64())
            .collect())
    }

    /// The single element of a one-element tensor, as f64.
    pub fn item(&self) -> f64 {
        assert_eq!(
            self.elem_count(),
            1,
            "item: tensor of shape {} has {} elements, not 1",
            self.shape(),
            self.elem_count()
        );
        self.to_f64_vec()[0]
    }

    /// A contiguous tensor with the same elements (this tensor itself when already contiguous).
    pub fn contiguous(&self) -> Tensor {
        if self.is_contiguous() {
            return self.clone();
        }
        let out = {
            let storage = self.storage();
            crate::with_storage!(&*storage, |b: T| {
                let mut out = Buffer::<T>::uninit(self.elem_count());
                let mut i = 0;
                self.layout().for_each_run(|start, n, stride| {
                    if stride == 1 {
                        out[i..i + n].copy_from_slice(&b[start..start + n]);
                    } else {
                        for (k, o) in out[i..i + n].iter_mut().enumerate() {
                            *o = b[start + k * stride];
                        }
                    }
                    i += n;
                });
                T::into_storage(out)
            })
        };
        // The copy is the identity on values: its gradient is the incoming gradient.
        Tensor::op_result(out, self.shape().clone(), &[self], || {
            Box::new(autograd::Identity)
        })
    }

    /// The elements converted to `dtype` (a copy; the same tensor when the dtype matches).
    /// Differentiable between float dtypes.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let src = self.contiguous();
        let storage = {
            let s = src.storage();
            let range = src.layout().contiguous_range().unwrap();
            crate::with_storage!(&*s, |b: S| convert(&b[range], dtype))
        };
        let differentiable = dtype.is_float() && self.dtype().is_float();
        let from = self.dtype();
        if differentiable {
            Tensor::op_result(storage, self.shape().clone(), &[self], || {
                Box::new(autograd::Cast { to: from })
            })
        } else {
            Tensor::from_storage(storage, Layout::contiguous(self.shape().clone()))
        }
    }

    // ------------------------------------------------------------------ autograd

    /// Marks this tensor as a leaf whose gradient is wanted, and returns it.
    pub fn requires_grad(self) -> Tensor {
        self.set_requires_grad(true);
        self
    }

    /// Turns gradient tracking of a leaf on or off (freezing a parameter).
    pub fn set_requires_grad(&self, on: bool) {
        assert!(
            self.0.node.is_none(),
            "set_requires_grad: only leaf tensors can change requires_grad (this one is the result of `{}`)",
            self.0.node.as_ref().map(|n| n.name()).unwrap_or("")
        );
        assert!(
            !on || self.dtype().is_float(),
            "requires_grad: only float tensors can require grad, got {}",
            self.dtype()
        );
        self.0.requires_grad.store(on, Ordering::Relaxed);
    }

    /// True when gradients flow to or through this tensor.
    pub fn tracks_grad(&self) -> bool {
        self.0.requires_grad.load(Ordering::Relaxed)
    }

    /// True for tensors that are not the result of a recorded op.
    pub fn is_leaf(&self) -> bool {
        self.0.node.is_none()
    }

    /// The gradient accumulated into this leaf by `backward` calls, if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.0.grad.lock().unwrap().clone()
    }

    /// Replaces the accumulated gradient of this leaf.
    pub fn set_grad(&self, grad: Option<Tensor>) {
        if let Some(g) = &grad {
            assert_eq!(
                g.shape(),
                self.shape(),
                "set_grad: gradient shape {} differs from tensor shape {}",
                g.shape(),
                self.shape()
            );
        }
        *self.0.grad.lock().unwrap() = grad;
    }

    /// Clears the accumulated gradient.
    pub fn zero_grad(&self) {
        self.set_grad(None);
    }

    /// A new leaf sharing this tensor's storage, cut off from the graph.
    pub fn detach(&self) -> Tensor {
        Tensor::from_shared_storage(self.0.storage.clone(), self.0.layout.clone())
    }

    /// The name of the op that produced this tensor, if it was recorded.
    pub fn grad_fn_name(&self) -> Option<&'static str> {
        self.0.node.as_ref().map(|n| n.name())
    }

    /// The result of an op: a contiguous tensor over `storage` with `shape`, recording a graph
    /// node with the backward built by `grad_fn` when any input tracks gradients and grad mode
    /// is on. This is how every differentiable op (built-in or custom) joins the graph.
    pub fn op_result<G: GradFn + 'static>(
        storage: Storage,
        shape: Shape,
        inputs: &[&Tensor],
        grad_fn: impl FnOnce() -> G,
    ) -> Tensor {
        Self::from_op_parts(
            Arc::new(RwLock::new(storage)),
            Layout::contiguous(shape),
            inputs,
            grad_fn,
        )
    }

    /// Like [`Tensor::op_result`] for a view: the result shares `storage` through `layout`.
    pub fn view_result<G: GradFn + 'static>(
        &self,
        layout: Layout,
        grad_fn: impl FnOnce() -> G,
    ) -> Tensor {
        Self::from_op_parts_typed(
            self.0.storage.clone(),
            self.dtype(),
            layout,
            &[self],
            grad_fn,
        )
    }

    pub(crate) fn from_op_parts<G: GradFn + 'static>(
        storage: Arc<RwLock<Storage>>,
        layout: Layout,
        inputs: &[&Tensor],
        grad_fn: impl FnOnce() -> G,
    ) -> Tensor {
        let dtype = storage.read().unwrap().dtype();
        Self::from_op_parts_typed(storage, dtype, layout, inputs, grad_fn)
    }

    fn from_op_parts_typed<G: GradFn + 'static>(
        storage: Arc<RwLock<Storage>>,
        dtype: DType,
        layout: Layout,
        inputs: &[&Tensor],
        grad_fn: impl FnOnce() -> G,
    ) -> Tensor {
        let record = autograd::is_grad_enabled() && inputs.iter().any(|t| t.tracks_grad());
        let node = record.then(|| Node::new_shared(grad_fn(), inputs));
        Tensor(Arc::new(TensorImpl {
            id: TensorId::next(),
            storage,
            layout,
            dtype,
            device: Device::Cpu,
            requires_grad: AtomicBool::new(record),
            node,
            grad: Mutex::new(None),
        }))
    }
}

fn convert<S: Element>(src: &[S], dtype: DType) -> Storage {
    match dtype {
        DType::F32 => Storage::F32(Buffer::from_fn(src.len(), |i| src[i].to_f64() as f32)),
        DType::F64 => Storage::F64(Buffer::from_fn(src.len(), |i| src[i].to_f64())),
        DType::I64 => Storage::I64(Buffer::from_fn(src.len(), |i| src[i].to_f64() as i64)),
        DType::U32 => Storage::U32(Buffer::from_fn(src.len(), |i| src[i].to_f64() as u32)),
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 16;
        let vals = self.to_f64_vec();
        write!(f, "Tensor[{}; {}", self.shape(), self.dtype())?;
        if let Some(n) = self.grad_fn_name() {
            write!(f, "; grad_fn={n}")?;
        } else if self.tracks_grad() {
            write!(f, "; requires_grad")?;
        }
        write!(f, "] {:?}", &vals[..vals.len().min(SHOWN)])?;
        if vals.len() > SHOWN {
            write!(f, " ...")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}
