//! A restricted unpickler: the pickle opcodes `torch.save` emits (protocols 2–5), building plain
//! data (ints, floats, strings, tuples, lists, dicts) plus storage and tensor references.
//!
//! Nothing is ever executed. `GLOBAL`/`STACK_GLOBAL` resolve only the tensor-rebuild allow-list
//! ([`Global`]); any other name is [`PickleError::Forbidden`]. `REDUCE`/`NEWOBJ` apply only
//! those globals, interpreted here. Every length is checked against the bytes left before
//! anything is sliced or allocated; the stack and memo grow by at most one entry per opcode, so
//! they are bounded by the input length. Lists and dicts live in an arena ([`Arena`]) so shared
//! and self-referencing containers are plain indices (no reference cycles).

use std::collections::HashMap;
use std::rc::Rc;

/// A PyTorch storage element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TorchDtype {
    /// `torch.float32` (`FloatStorage`).
    F32,
    /// `torch.float64` (`DoubleStorage`).
    F64,
    /// `torch.float16` (`HalfStorage`).
    F16,
    /// `torch.bfloat16` (`BFloat16Storage`).
    BF16,
    /// `torch.int64` (`LongStorage`).
    I64,
    /// `torch.int32` (`IntStorage`).
    I32,
    /// `torch.int16` (`ShortStorage`).
    I16,
    /// `torch.int8` (`CharStorage`).
    I8,
    /// `torch.uint8` (`ByteStorage`).
    U8,
    /// `torch.bool` (`BoolStorage`).
    Bool,
}

impl TorchDtype {
    /// The dtype of storage class `torch.<name>`, e.g. `FloatStorage`.
    pub fn from_storage_class(name: &str) -> Option<TorchDtype> {
        use TorchDtype::*;
        Some(match name {
            "FloatStorage" => F32,
            "DoubleStorage" => F64,
            "HalfStorage" => F16,
            "BFloat16Storage" => BF16,
            "LongStorage" => I64,
            "IntStorage" => I32,
            "ShortStorage" => I16,
            "CharStorage" => I8,
            "ByteStorage" => U8,
            "BoolStorage" => Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        use TorchDtype::*;
        match self {
            F64 | I64 => 8,
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 | U8 | Bool => 1,
        }
    }

    /// The torch name (`float32`, ...).
    pub fn name(self) -> &'static str {
        use TorchDtype::*;
        match self {
            F32 => "float32",
            F64 => "float64",
            F16 => "float16",
            BF16 => "bfloat16",
            I64 => "int64",
            I32 => "int32",
            I16 => "int16",
            I8 => "int8",
            U8 => "uint8",
            Bool => "bool",
        }
    }
}

/// The globals a weights file may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    StorageClass(TorchDtype),
    Size,
}

impl Global {
    fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::RebuildParameterWithState => {
                "torch._utils._rebuild_parameter_with_state".into()
            }
            Global::StorageClass(d) => format!("storage class of {}", d.name()),
            Global::Size => "torch.Size".into(),
        }
    }
}

/// A storage as referenced by a persistent id: `('storage', <class>, key, location, numel
/// [, view])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    /// The storage's key: its record `data/<key>` (zip) or its entry in the key list (legacy).
    pub key: String,
    pub dtype: TorchDtype,
    /// Elements in the whole storage.
    pub numel: u64,
    /// A legacy storage view: `(offset, len)` in elements of the root storage.
    pub view: Option<(u64, u64)>,
}

/// A tensor: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// An unpickled value.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64: its little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    /// Read only through `Debug` (error messages) and tests.
    #[allow(dead_code)]
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    /// Index into [`Arena::lists`].
    List(usize),
    /// Index into [`Arena::dicts`].
    Dict(usize),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// The Python-ish type name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// The text of a `str` (or ASCII-decoded `bytes`, as torch's `_maybe_decode_ascii`).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            Value::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// A hashable dict key (Python equality: `True == 1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    None,
    Int(i64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
}

fn key_of(v: &Value) -> Option<Key> {
    Some(match v {
        Value::None => Key::None,
        Value::Bool(b) => Key::Int(*b as i64),
        Value::Int(i) => Key::Int(*i),
        Value::Str(s) => Key::Str(s.clone()),
        Value::Bytes(b) => Key::Bytes(b.clone()),
        _ => return None,
    })
}

/// A dict: entries in insertion order, a later `SETITEM` of an equal key replacing the value.
#[derive(Debug, Default)]
pub(crate) struct DictObj {
    pub entries: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
}

impl DictObj {
    fn set(&mut self, k: Value, v: Value) {
        match key_of(&k) {
            Some(key) => match self.index.get(&key) {
                Some(&i) => self.entries[i].1 = v,
                None => {
                    self.index.insert(key, self.entries.len());
                    self.entries.push((k, v));
                }
            },
            None => self.entries.push((k, v)),
        }
    }

    /// The value of string key `k`.
    pub fn get_str(&self, k: &str) -> Option<&Value> {
        self.index
            .get(&Key::Str(Rc::from(k)))
            .map(|&i| &self.entries[i].1)
    }
}

/// The lists and dicts one pickle built.
#[derive(Debug, Default)]
pub(crate) struct Arena {
    pub lists: Vec<Vec<Value>>,
    pub dicts: Vec<DictObj>,
}

/// Why unpickling failed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PickleError {
    /// Malformed or truncated input.
    Format(String),
    /// A global outside the allow-list (`module.name`).
    Forbidden(String),
    /// Well formed, but something kiln cannot load (a pickled module, a storage dtype).
    Unsupported(String),
}

type PResult<T> = std::result::Result<T, PickleError>;

/// Storages seen in persistent ids: key → (dtype, numel), first-seen order.
#[derive(Debug, Default)]
pub(crate) struct StorageTable {
    pub order: Vec<String>,
    pub meta: HashMap<String, (TorchDtype, u64)>,
}

/// The result of one pickle.
pub(crate) struct Unpickled {
    pub value: Value,
    pub arena: Arena,
    /// Offset just past the STOP opcode.
    pub end: usize,
}

/// Unpickles the pickle starting at `data[start..]`, recording storages in `storages`.
pub(crate) fn unpickle(
    data: &[u8],
    start: usize,
    storages: &mut StorageTable,
) -> PResult<Unpickled> {
    let mut u = Unpickler {
        data,
        pos: start,
        op_pos: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        arena: Arena::default(),
        storages,
    };
    let value = u.run()?;
    Ok(Unpickled {
        value,
        end: u.pos,
        arena: u.arena,
    })
}

struct Unpickler<'a, 's> {
    data: &'a [u8],
    pos: usize,
    op_pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    arena: Arena,
    storages: &'s mut StorageTable,
}

impl Unpickler<'_, '_> {
    fn err(&self, msg: impl std::fmt::Display) -> PickleError {
        PickleError::Format(format!("at byte {}: {msg}", self.op_pos))
    }

    fn take(&mut self, n: u64, what: &str) -> PResult<&[u8]> {
        let left = self.data.len() - self.pos;
        if n > left as u64 {
            return Err(self.err(format!(
                "{what} needs {n} bytes, only {left} left (truncated)"
            )));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> PResult<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("length checked"))
    }

    fn pop(&mut self, op: &str) -> PResult<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("{op} on an empty stack")));
        }
        Ok(self.stack.pop().expect("length checked"))
    }

    fn top(&self, op: &str) -> PResult<&Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(format!("{op} on an empty stack")));
        }
        Ok(self.stack.last().expect("length checked"))
    }

    fn pop_mark(&mut self, op: &str) -> PResult<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err(format!("{op} without a MARK")))?;
        Ok(self.stack.split_off(mark))
    }

    fn line(&mut self, what: &str) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err(format!("{what} is not newline-terminated (truncated)")))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| self.err(format!("{what} is not UTF-8")))?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: u64, what: &str) -> PResult<Value> {
        let b = self.take(n, what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => Err(self.err(format!("{what} is not UTF-8"))),
        }
    }

    fn memo_put(&mut self, idx: u32) -> PResult<()> {
        let v = self.top("PUT")?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> PResult<()> {
        let v = self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo entry {idx} read before it was written")))?
            .clone();
        self.stack.push(v);
        Ok(())
    }

    fn new_dict(&mut self) -> Value {
        self.arena.dicts.push(DictObj::default());
        Value::Dict(self.arena.dicts.len() - 1)
    }

    fn new_list(&mut self, items: Vec<Value>) -> Value {
        self.arena.lists.push(items);
        Value::List(self.arena.lists.len() - 1)
    }

    fn set_items(&mut self, target: &Value, items: Vec<Value>, op: &str) -> PResult<()> {
        let Value::Dict(d) = *target else {
            return Err(self.err(format!("{op} on a {}, not a dict", target.kind())));
        };
        if !items.len().is_multiple_of(2) {
            return Err(self.err(format!("{op} with an odd number of items")));
        }
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            self.arena.dicts[d].set(k, v);
        }
        Ok(())
    }

    fn append(&mut self, target: &Value, items: Vec<Value>, op: &str) -> PResult<()> {
        let Value::List(l) = *target else {
            return Err(self.err(format!("{op} on a {}, not a list", target.kind())));
        };
        self.arena.lists[l].extend(items);
        Ok(())
    }

    fn global(&self, module: &str, name: &str) -> PResult<Value> {
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch", "Size") => Global::Size,
            ("torch" | "torch.cuda", n) if TorchDtype::from_storage_class(n).is_some() => {
                Global::StorageClass(TorchDtype::from_storage_class(n).expect("checked"))
            }
            _ => return Err(PickleError::Forbidden(format!("{module}.{name}"))),
        };
        Ok(Value::Global(g))
    }

    fn usize_tuple(&self, v: &Value, what: &str) -> PResult<Vec<u64>> {
        let items: &[Value] = match v {
            Value::Tuple(t) => t,
            Value::List(l) => &self.arena.lists[*l],
            _ => return Err(self.err(format!("{what} is a {}, not a tuple", v.kind()))),
        };
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as u64),
                _ => Err(self.err(format!("{what} holds {x:?}, not a non-negative int"))),
            })
            .collect()
    }

    fn uint(&self, v: &Value, what: &str) -> PResult<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            _ => Err(self.err(format!("{what} is {v:?}, not a non-negative int"))),
        }
    }

    fn tensor(&self, args: &[Value], g: Global) -> PResult<Value> {
        let Value::Storage(storage) = &args[0] else {
            return Err(self.err(format!(
                "{}: first argument is a {}, not a storage",
                g.name(),
                args[0].kind()
            )));
        };
        let offset = self.uint(&args[1], "storage offset")?;
        let size = self.usize_tuple(&args[2], "tensor size")?;
        let stride = self.usize_tuple(&args[3], "tensor stride")?;
        if size.len() != stride.len() {
            return Err(self.err(format!(
                "tensor size {size:?} and stride {stride:?} differ in length"
            )));
        }
        Ok(Value::Tensor(Rc::new(TensorRef {
            storage: storage.clone(),
            offset,
            size,
            stride,
        })))
    }

    /// Applies allow-listed callable `g` to `args` (REDUCE, NEWOBJ).
    fn call(&mut self, g: Global, args: &[Value]) -> PResult<Value> {
        let arity = |ok: bool| -> PResult<()> {
            if ok {
                Ok(())
            } else {
                Err(self.err(format!("{} called with {} arguments", g.name(), args.len())))
            }
        };
        match g {
            Global::OrderedDict => {
                arity(args.len() <= 1)?;
                let d = self.new_dict();
                if let Some(items) = args.first() {
                    let pairs: Vec<Value> = match items {
                        Value::Tuple(t) => t.to_vec(),
                        Value::List(l) => self.arena.lists[*l].clone(),
                        other => {
                            return Err(self.err(format!(
                                "OrderedDict argument is a {}, not a list of pairs",
                                other.kind()
                            )))
                        }
                    };
                    let mut flat = Vec::with_capacity(pairs.len() * 2);
                    for p in pairs {
                        match p {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                flat.push(kv[0].clone());
                                flat.push(kv[1].clone());
                            }
                            other => {
                                return Err(self.err(format!(
                                    "OrderedDict item is a {}, not a (key, value) pair",
                                    other.kind()
                                )))
                            }
                        }
                    }
                    self.set_items(&d, flat, "OrderedDict")?;
                }
                Ok(d)
            }
            Global::Size => {
                arity(args.len() <= 1)?;
                let dims = match args.first() {
                    Some(v) => self.usize_tuple(v, "torch.Size argument")?,
                    None => Vec::new(),
                };
                Ok(Value::Tuple(
                    dims.into_iter().map(|d| Value::Int(d as i64)).collect(),
                ))
            }
            Global::RebuildTensorV2 => {
                arity((6..=7).contains(&args.len()))?;
                self.tensor(args, g)
            }
            Global::RebuildTensor => {
                arity(args.len() == 4)?;
                self.tensor(args, g)
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                arity(args.len() == if g == Global::RebuildParameter { 3 } else { 4 })?;
                match &args[0] {
                    t @ Value::Tensor(_) => Ok(t.clone()),
                    other => Err(self.err(format!(
                        "{}: data is a {}, not a tensor",
                        g.name(),
                        other.kind()
                    ))),
                }
            }
            Global::StorageClass(_) => Err(self.err(format!(
                "{} called directly (storages come from persistent ids)",
                g.name()
            ))),
        }
    }

    /// `persistent_load`: `('storage', class, key, location, numel[, view_metadata])`.
    fn persistent(&mut self, pid: Value) -> PResult<Value> {
        let Value::Tuple(t) = &pid else {
            return Err(self.err(format!("persistent id is a {}, not a tuple", pid.kind())));
        };
        let kind = t.first().and_then(Value::as_str).unwrap_or("");
        if kind == "module" {
            return Err(PickleError::Unsupported(
                "the file holds a pickled nn.Module, not a state dict (save model.state_dict())"
                    .into(),
            ));
        }
        if kind != "storage" || !(5..=6).contains(&t.len()) {
            return Err(self.err(format!("unknown persistent id {pid:?}")));
        }
        let dtype = match &t[1] {
            Value::Global(Global::StorageClass(d)) => *d,
            other => {
                return Err(self.err(format!(
                    "persistent id storage type is {other:?}, not a storage class"
                )))
            }
        };
        let key = t[2]
            .as_str()
            .ok_or_else(|| self.err(format!("storage key is a {}", t[2].kind())))?
            .to_string();
        if t[3].as_str().is_none() {
            return Err(self.err(format!("storage location is a {}", t[3].kind())));
        }
        let numel = self.uint(&t[4], "storage size")?;
        let view = match t.get(5) {
            None | Some(Value::None) => None,
            Some(Value::Tuple(v)) if v.len() == 3 => {
                let off = self.uint(&v[1], "storage view offset")?;
                let len = self.uint(&v[2], "storage view size")?;
                if off.checked_add(len).is_none_or(|e| e > numel) {
                    return Err(self.err(format!(
                        "storage '{key}': view {off}..{off}+{len} exceeds its {numel} elements"
                    )));
                }
                Some((off, len))
            }
            Some(other) => {
                return Err(self.err(format!("storage view metadata is {other:?}")));
            }
        };
        match self.storages.meta.get(&key) {
            Some(&(d, n)) if (d, n) != (dtype, numel) => {
                return Err(self.err(format!(
                    "storage '{key}' is referenced as {} × {n} and as {} × {numel}",
                    d.name(),
                    dtype.name()
                )))
            }
            Some(_) => {}
            None => {
                self.storages.meta.insert(key.clone(), (dtype, numel));
                self.storages.order.push(key.clone());
            }
        }
        Ok(Value::Storage(Rc::new(StorageRef {
            key,
            dtype,
            numel,
            view,
        })))
    }

    fn int_from_le(&self, b: &[u8]) -> Value {
        if b.is_empty() {
            return Value::Int(0);
        }
        let neg = b[b.len() - 1] & 0x80 != 0;
        let fill = if neg { 0xff } else { 0 };
        // Fits in i64 when every byte beyond the 8th is sign extension of the 8th.
        let fits = b.len() <= 8 || (b[8..].iter().all(|&x| x == fill) && (b[7] & 0x80 != 0) == neg);
        if fits {
            let mut w = [fill; 8];
            let n = b.len().min(8);
            w[..n].copy_from_slice(&b[..n]);
            Value::Int(i64::from_le_bytes(w))
        } else {
            Value::BigInt(Rc::from(b))
        }
    }

    fn run(&mut self) -> PResult<Value> {
        loop {
            self.op_pos = self.pos;
            let [op] = self.arr::<1>("opcode")?;
            match op {
                0x80 => {
                    // PROTO
                    let [v] = self.arr::<1>("PROTO")?;
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} not supported (≤ 5)")));
                    }
                }
                0x95 => {
                    // FRAME: only a length hint; check it lies within the input.
                    let n = u64::from_le_bytes(self.arr::<8>("FRAME")?);
                    let left = (self.data.len() - self.pos) as u64;
                    if n > left {
                        return Err(self.err(format!(
                            "frame of {n} bytes exceeds the {left} bytes left (truncated)"
                        )));
                    }
                }
                b'.' => {
                    // STOP
                    let v = self.pop("STOP")?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => {
                    let d = self.new_dict();
                    self.stack.push(d);
                }
                b']' => {
                    let l = self.new_list(Vec::new());
                    self.stack.push(l);
                }
                b')' => self.stack.push(Value::Tuple(Rc::from(Vec::new()))),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.arr::<4>("BININT")?);
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let [v] = self.arr::<1>("BININT1")?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr::<2>("BININT2")?);
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4
                    let n = if op == 0x8a {
                        self.arr::<1>("LONG1")?[0] as i64
                    } else {
                        i32::from_le_bytes(self.arr::<4>("LONG4")?) as i64
                    };
                    if n < 0 {
                        return Err(self.err(format!("LONG4 with negative length {n}")));
                    }
                    let b = self.take(n as u64, "LONG")?.to_vec();
                    let v = self.int_from_le(&b);
                    self.stack.push(v);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.arr::<8>("BINFLOAT")?);
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.arr::<4>("BINUNICODE")?);
                    let v = self.string(n as u64, "BINUNICODE")?;
                    self.stack.push(v);
                }
                0x8c => {
                    let [n] = self.arr::<1>("SHORT_BINUNICODE")?;
                    let v = self.string(n as u64, "SHORT_BINUNICODE")?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.arr::<8>("BINUNICODE8")?);
                    let v = self.string(n, "BINUNICODE8")?;
                    self.stack.push(v);
                }
                b'B' | b'C' | 0x8e | b'T' | b'U' => {
                    // BINBYTES, SHORT_BINBYTES, BINBYTES8, BINSTRING, SHORT_BINSTRING
                    let n = match op {
                        b'C' | b'U' => self.arr::<1>("SHORT_BINBYTES")?[0] as u64,
                        b'B' => u32::from_le_bytes(self.arr::<4>("BINBYTES")?) as u64,
                        b'T' => {
                            let n = i32::from_le_bytes(self.arr::<4>("BINSTRING")?);
                            if n < 0 {
                                return Err(self.err(format!("BINSTRING with negative length {n}")));
                            }
                            n as u64
                        }
                        _ => u64::from_le_bytes(self.arr::<8>("BINBYTES8")?),
                    };
                    let b = self.take(n, "bytes")?;
                    let v = Value::Bytes(Rc::from(b));
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark("TUPLE")?;
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(self.err(format!("TUPLE{n} with fewer than {n} items")));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                b'l' => {
                    let items = self.pop_mark("LIST")?;
                    let l = self.new_list(items);
                    self.stack.push(l);
                }
                b'd' => {
                    let items = self.pop_mark("DICT")?;
                    let d = self.new_dict();
                    self.set_items(&d, items, "DICT")?;
                    self.stack.push(d);
                }
                b's' => {
                    let v = self.pop("SETITEM")?;
                    let k = self.pop("SETITEM")?;
                    let target = self.top("SETITEM")?.clone();
                    self.set_items(&target, vec![k, v], "SETITEM")?;
                }
                b'u' => {
                    let items = self.pop_mark("SETITEMS")?;
                    let target = self.top("SETITEMS")?.clone();
                    self.set_items(&target, items, "SETITEMS")?;
                }
                b'a' => {
                    let v = self.pop("APPEND")?;
                    let target = self.top("APPEND")?.clone();
                    self.append(&target, vec![v], "APPEND")?;
                }
                b'e' => {
                    let items = self.pop_mark("APPENDS")?;
                    let target = self.top("APPENDS")?.clone();
                    self.append(&target, items, "APPENDS")?;
                }
                b'0' => {
                    self.pop("POP")?;
                }
                b'1' => {
                    self.pop_mark("POP_MARK")?;
                }
                b'2' => {
                    let v = self.top("DUP")?.clone();
                    self.stack.push(v);
                }
                b'q' => {
                    let [i] = self.arr::<1>("BINPUT")?;
                    self.memo_put(i as u32)?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.arr::<4>("LONG_BINPUT")?);
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i =
                        u32::try_from(self.memo.len()).map_err(|_| self.err("memo overflow"))?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let [i] = self.arr::<1>("BINGET")?;
                    self.memo_get(i as u32)?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.arr::<4>("LONG_BINGET")?);
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line("GLOBAL module")?;
                    let name = self.line("GLOBAL name")?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop("STACK_GLOBAL")?;
                    let module = self.pop("STACK_GLOBAL")?;
                    let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                        return Err(self.err(format!(
                            "STACK_GLOBAL of a {} and a {}, not strings",
                            module.kind(),
                            name.kind()
                        )));
                    };
                    let g = self.global(m, n)?;
                    self.stack.push(g);
                }
                b'R' | 0x81 | 0x92 => {
                    // REDUCE, NEWOBJ, NEWOBJ_EX
                    let opname = match op {
                        b'R' => "REDUCE",
                        0x81 => "NEWOBJ",
                        _ => "NEWOBJ_EX",
                    };
                    if op == 0x92 {
                        let kwargs = self.pop(opname)?;
                        let empty = matches!(kwargs, Value::Dict(d) if self.arena.dicts[d].entries.is_empty());
                        if !empty {
                            return Err(self.err("NEWOBJ_EX with keyword arguments"));
                        }
                    }
                    let args = self.pop(opname)?;
                    let f = self.pop(opname)?;
                    let Value::Tuple(args) = args else {
                        return Err(self.err(format!(
                            "{opname} arguments are a {}, not a tuple",
                            args.kind()
                        )));
                    };
                    let Value::Global(g) = f else {
                        return Err(self.err(format!("{opname} applied to a {}", f.kind())));
                    };
                    let v = self.call(g, &args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: instance state (e.g. an OrderedDict's `_metadata`) is not needed.
                    let _state = self.pop("BUILD")?;
                    let target = self.top("BUILD")?;
                    if !matches!(target, Value::Dict(_) | Value::Tensor(_)) {
                        return Err(self.err(format!("BUILD on a {}", target.kind())));
                    }
                }
                b'Q' => {
                    let pid = self.pop("BINPERSID")?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                _ => {
                    return Err(self.err(format!(
                        "opcode 0x{op:02x} ({}) is not allowed in a weights file",
                        opcode_name(op)
                    )))
                }
            }
        }
    }
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'F' => "FLOAT",
        b'I' => "INT",
        b'L' => "LONG",
        b'P' => "PERSID",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'g' => "GET",
        b'p' => "PUT",
        b'i' => "INST",
        b'o' => "OBJ",
        0x82..=0x84 => "EXT",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: &[u8]) -> PResult<Unpickled> {
        unpickle(b, 0, &mut StorageTable::default())
    }

    #[test]
    fn plain_values() {
        // pickle.dumps({'a': [1, -2, 300, 2**40], 'b': (1.5, True, None)}, protocol=2)
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', 0x8c, 1, b'a', b']', b'(', b'K', 1,
        ];
        p.extend_from_slice(&[b'J', 0xfe, 0xff, 0xff, 0xff, b'M', 0x2c, 0x01]);
        p.extend_from_slice(&[0x8a, 6, 0, 0, 0, 0, 0, 1, b'e']);
        p.extend_from_slice(&[0x8c, 1, b'b', b'G']);
        p.extend_from_slice(&1.5f64.to_be_bytes());
        p.extend_from_slice(&[0x88, b'N', 0x87, b'u', b'.']);
        let u = run(&p).unwrap();
        let Value::Dict(d) = u.value else { panic!() };
        let d = &u.arena.dicts[d];
        let Some(Value::List(l)) = d.get_str("a") else {
            panic!()
        };
        let ints: Vec<i64> = u.arena.lists[*l]
            .iter()
            .map(|v| match v {
                Value::Int(i) => *i,
                _ => panic!(),
            })
            .collect();
        assert_eq!(ints, [1, -2, 300, 1 << 40]);
        let Some(Value::Tuple(t)) = d.get_str("b") else {
            panic!()
        };
        assert!(matches!(t[..], [Value::Float(f), Value::Bool(true), Value::None] if f == 1.5));
        assert_eq!(u.end, p.len());
    }

    #[test]
    fn long1_sign_and_bigint() {
        let u = run(&[0x8a, 1, 0xff, b'.']).unwrap();
        assert!(matches!(u.value, Value::Int(-1)));
        let u = run(&[0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, b'.']).unwrap();
        assert!(matches!(u.value, Value::Int(i64::MIN)));
        let u = run(&[0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, b'.']).unwrap();
        assert!(matches!(u.value, Value::BigInt(_)));
    }

    #[test]
    fn forbidden_globals() {
        let e = run(b"\x80\x02cos\nsystem\nq\x00.").err().unwrap();
        assert_eq!(e, PickleError::Forbidden("os.system".into()));
        let e = run(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.")
            .err()
            .unwrap();
        assert_eq!(e, PickleError::Forbidden("builtins.eval".into()));
    }

    #[test]
    fn errors_not_panics() {
        for bad in [
            &b""[..],
            b"\x80",
            b"X\xff\xff\xff\xff",
            b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"h\x05.",
            b"t.",
            b"s.",
            b"(K\x01K\x02K\x03}u.",
            b"K\x01K\x02R.",
            b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f.",
            b"(.",
        ] {
            assert!(matches!(run(bad), Err(PickleError::Format(_))), "{bad:?}");
        }
    }
}
