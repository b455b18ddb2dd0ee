//! One serde walk, two readings of a value: its canonical bytes and its shape.
//!
//! - [`canonical`] gives the bytes that fingerprints and derived keys hash: exactly bincode 2's
//!   standard encoding, except that a map's entries are sorted by their own canonical bytes,
//!   so equal maps give equal bytes whatever their iteration order (a `HashMap`'s differs per
//!   instance). Values without maps keep the bytes, and so the fingerprints, of format 1.
//! - [`shape`] gives a 64-bit digest of a value's structure, not its data: field names in
//!   order, enum variant names and indexes, primitive kinds, option/sequence/map nesting. A
//!   stored outcome carries the shape it was written with; a replay decodes the bytes and
//!   compares the decoded value's shape, so a changed type (a `u32` now read as `String`,
//!   swapped fields, a variant list that shifted) is an error instead of a different value.
//!   Sequence elements and map entries count as a set of distinct shapes, so iteration order
//!   (of a `HashSet`, say) never changes a shape.
//!
//! Invariants: the walk never panics on its own; a `Serialize` implementation that fails ends
//! it with [`WalkError`]. Container names (struct and enum names) are left out of both, so
//! renaming a type changes neither.

use serde::ser::{self, Serialize};
use std::fmt;

/// A `Serialize` implementation failed (or asked for something the walk cannot express).
#[derive(Debug)]
pub(crate) struct WalkError(pub String);

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WalkError {}

impl ser::Error for WalkError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        WalkError(msg.to_string())
    }
}

/// The canonical bytes of `value` (see the module docs).
pub(crate) fn canonical<V: Serialize + ?Sized>(value: &V) -> Result<Vec<u8>, WalkError> {
    let mut sink = Canonical {
        bytes: Vec::new(),
        sort_sequences: false,
    };
    value.serialize(Walker(&mut sink))?;
    Ok(sink.bytes)
}

/// The bytes of `value`'s data with the order of every sequence and map left out: equal for a
/// value and its decoded copy exactly when the codec kept every datum (a `HashSet` decodes in
/// another order; a float written with too few digits decodes as a neighbour).
pub(crate) fn data<V: Serialize + ?Sized>(value: &V) -> Result<Vec<u8>, WalkError> {
    let mut sink = Canonical {
        bytes: Vec::new(),
        sort_sequences: true,
    };
    value.serialize(Walker(&mut sink))?;
    Ok(sink.bytes)
}

/// The shape digest of `value` (see the module docs); never 0.
pub(crate) fn shape<V: Serialize + ?Sized>(value: &V) -> Result<u64, WalkError> {
    let mut sink = Shape::new();
    value.serialize(Walker(&mut sink))?;
    Ok(sink.0 | 1)
}

/// Kinds of serde data model nodes, as shape tokens.
#[derive(Clone, Copy)]
enum Kind {
    Bool = 1,
    I8,
    I16,
    I32,
    I64,
    I128,
    U8,
    U16,
    U32,
    U64,
    U128,
    F32,
    F64,
    Char,
    Str,
    Bytes,
    None,
    Some,
    Unit,
    Seq,
    Map,
    Tuple,
    Field,
    Skipped,
    Variant,
}

/// What a walk produces.
trait Sink: Sized {
    /// Elements of one sequence or entries of one map, before they are folded in.
    type Items: Default;
    fn fresh(&self) -> Self;
    /// A primitive value: canonical writes its bincode encoding; shape notes its kind.
    fn prim<V: bincode::Encode + ?Sized>(&mut self, kind: Kind, value: &V);
    /// A structural token with no bytes in bincode (unit, struct field names).
    fn mark(&mut self, kind: Kind, name: &str);
    fn variant(&mut self, index: u32, name: &str);
    fn add(items: &mut Self::Items, child: Self);
    fn end_seq(&mut self, items: Self::Items);
    fn end_map(&mut self, items: Self::Items);
}

struct Canonical {
    bytes: Vec<u8>,
    /// Sort sequence elements too (for [`data`]).
    sort_sequences: bool,
}

impl Canonical {
    fn put<V: bincode::Encode + ?Sized>(&mut self, value: &V) {
        // Invariant: encoding a primitive into a Vec cannot fail (no limit, infallible writer).
        let _ = bincode::encode_into_std_write(value, &mut self.bytes, bincode::config::standard());
    }
}

impl Sink for Canonical {
    type Items = Vec<Vec<u8>>;

    fn fresh(&self) -> Self {
        Canonical {
            bytes: Vec::new(),
            sort_sequences: self.sort_sequences,
        }
    }
    fn prim<V: bincode::Encode + ?Sized>(&mut self, _: Kind, value: &V) {
        self.put(value);
    }
    fn mark(&mut self, _: Kind, _: &str) {}
    fn variant(&mut self, index: u32, _: &str) {
        self.put(&index);
    }
    fn add(items: &mut Self::Items, child: Self) {
        items.push(child.bytes);
    }
    fn end_seq(&mut self, mut items: Self::Items) {
        if self.sort_sequences {
            items.sort_unstable();
        }
        self.put(&(items.len() as u64));
        items.iter().for_each(|i| self.bytes.extend_from_slice(i));
    }
    fn end_map(&mut self, mut items: Self::Items) {
        items.sort_unstable();
        self.end_seq(items);
    }
}

/// An FNV-1a style digest over structural tokens.
struct Shape(u64);

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Shape {
    fn new() -> Self {
        Shape(FNV_OFFSET)
    }
    fn token(&mut self, t: u64) {
        self.0 = (self.0 ^ t).wrapping_mul(FNV_PRIME);
    }
    fn name(&mut self, name: &str) {
        for b in name.bytes() {
            self.token(u64::from(b));
        }
        self.token(0xff);
    }
    fn fold(&mut self, kind: Kind, mut distinct: Vec<u64>) {
        self.token(kind as u64);
        distinct.sort_unstable();
        for d in distinct {
            self.token(d);
        }
        self.token(0xfe);
    }
}

impl Sink for Shape {
    /// The distinct shapes of the elements (usually one).
    type Items = Vec<u64>;

    fn fresh(&self) -> Self {
        Shape::new()
    }
    fn prim<V: bincode::Encode + ?Sized>(&mut self, kind: Kind, _: &V) {
        self.token(kind as u64);
    }
    fn mark(&mut self, kind: Kind, name: &str) {
        self.token(kind as u64);
        self.name(name);
    }
    fn variant(&mut self, index: u32, name: &str) {
        self.token(Kind::Variant as u64);
        self.token(u64::from(index));
        self.name(name);
    }
    fn add(items: &mut Self::Items, child: Self) {
        if !items.contains(&child.0) {
            items.push(child.0);
        }
    }
    fn end_seq(&mut self, items: Self::Items) {
        self.fold(Kind::Seq, items);
    }
    fn end_map(&mut self, items: Self::Items) {
        self.fold(Kind::Map, items);
    }
}

struct Walker<'a, S>(&'a mut S);

/// A compound value being walked: fields go straight to the sink; sequence elements and map
/// entries are walked into fresh sinks and folded in at the end.
struct Compound<'a, S: Sink> {
    sink: &'a mut S,
    items: S::Items,
    entry: Option<S>,
}

impl<'a, S: Sink> Compound<'a, S> {
    fn new(sink: &'a mut S) -> Self {
        Self {
            sink,
            items: S::Items::default(),
            entry: None,
        }
    }

    fn item<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
        let mut child = self.sink.fresh();
        value.serialize(Walker(&mut child))?;
        S::add(&mut self.items, child);
        Ok(())
    }

    fn direct<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
        value.serialize(Walker(&mut *self.sink))
    }
}

macro_rules! prim {
    ($($method:ident($ty:ty) => $kind:ident),* $(,)?) => {$(
        fn $method(self, v: $ty) -> Result<(), WalkError> {
            self.0.prim(Kind::$kind, &v);
            Ok(())
        }
    )*};
}

impl<'a, S: Sink> ser::Serializer for Walker<'a, S> {
    type Ok = ();
    type Error = WalkError;
    type SerializeSeq = Compound<'a, S>;
    type SerializeTuple = Compound<'a, S>;
    type SerializeTupleStruct = Compound<'a, S>;
    type SerializeTupleVariant = Compound<'a, S>;
    type SerializeMap = Compound<'a, S>;
    type SerializeStruct = Compound<'a, S>;
    type SerializeStructVariant = Compound<'a, S>;

    /// As bincode's serializer: types with a compact form (addresses, UUIDs) use it, so
    /// canonical bytes equal bincode's and shapes follow the compact form.
    fn is_human_readable(&self) -> bool {
        false
    }

    prim! {
        serialize_bool(bool) => Bool,
        serialize_i8(i8) => I8,
        serialize_i16(i16) => I16,
        serialize_i32(i32) => I32,
        serialize_i64(i64) => I64,
        serialize_i128(i128) => I128,
        serialize_u8(u8) => U8,
        serialize_u16(u16) => U16,
        serialize_u32(u32) => U32,
        serialize_u64(u64) => U64,
        serialize_u128(u128) => U128,
        serialize_f32(f32) => F32,
        serialize_f64(f64) => F64,
        serialize_char(char) => Char,
        serialize_str(&str) => Str,
        serialize_bytes(&[u8]) => Bytes,
    }

    fn serialize_none(self) -> Result<(), WalkError> {
        self.0.prim(Kind::None, &0u8);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), WalkError> {
        self.0.prim(Kind::Some, &1u8);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), WalkError> {
        self.0.mark(Kind::Unit, "");
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), WalkError> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        i: u32,
        v: &'static str,
    ) -> Result<(), WalkError> {
        self.0.variant(i, v);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), WalkError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        i: u32,
        v: &'static str,
        value: &T,
    ) -> Result<(), WalkError> {
        self.0.variant(i, v);
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Compound<'a, S>, WalkError> {
        Ok(Compound::new(self.0))
    }
    fn serialize_tuple(self, len: usize) -> Result<Compound<'a, S>, WalkError> {
        self.0.mark(Kind::Tuple, &len.to_string());
        Ok(Compound::new(self.0))
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        len: usize,
    ) -> Result<Compound<'a, S>, WalkError> {
        self.serialize_tuple(len)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        i: u32,
        v: &'static str,
        _: usize,
    ) -> Result<Compound<'a, S>, WalkError> {
        self.0.variant(i, v);
        Ok(Compound::new(self.0))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Compound<'a, S>, WalkError> {
        Ok(Compound::new(self.0))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound<'a, S>, WalkError> {
        Ok(Compound::new(self.0))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        i: u32,
        v: &'static str,
        _: usize,
    ) -> Result<Compound<'a, S>, WalkError> {
        self.0.variant(i, v);
        Ok(Compound::new(self.0))
    }
}

impl<S: Sink> ser::SerializeSeq for Compound<'_, S> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
        self.item(value)
    }
    fn end(self) -> Result<(), WalkError> {
        self.sink.end_seq(self.items);
        Ok(())
    }
}

/// Compounds whose parts are walked in order into the parent's sink (tuples).
macro_rules! in_order {
    ($($trait:ident :: $method:ident),*) => {$(
        impl<S: Sink> ser::$trait for Compound<'_, S> {
            type Ok = ();
            type Error = WalkError;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
                self.direct(value)
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
    )*};
}

in_order!(
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl<S: Sink> ser::SerializeMap for Compound<'_, S> {
    type Ok = ();
    type Error = WalkError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), WalkError> {
        let mut entry = self.sink.fresh();
        key.serialize(Walker(&mut entry))?;
        self.entry = Some(entry);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
        let mut entry = self
            .entry
            .take()
            .ok_or_else(|| WalkError("a map value was serialized before its key".into()))?;
        value.serialize(Walker(&mut entry))?;
        S::add(&mut self.items, entry);
        Ok(())
    }
    fn end(self) -> Result<(), WalkError> {
        self.sink.end_map(self.items);
        Ok(())
    }
}

/// Compounds of named fields (structs, struct variants): each field's name, then its value.
macro_rules! named_fields {
    ($($trait:ident),*) => {$(
        impl<S: Sink> ser::$trait for Compound<'_, S> {
            type Ok = ();
            type Error = WalkError;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> Result<(), WalkError> {
                self.sink.mark(Kind::Field, name);
                self.direct(value)
            }
            fn skip_field(&mut self, name: &'static str) -> Result<(), WalkError> {
                self.sink.mark(Kind::Skipped, name);
                Ok(())
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
    )*};
}

named_fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use std::collections::{BTreeMap, HashMap};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    enum E {
        A,
        B(u32),
        C { x: i64, y: String },
        D(u8, Option<bool>),
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct S {
        a: u64,
        b: Vec<E>,
        c: (char, f64, i128),
        d: Option<Vec<u8>>,
        e: BTreeMap<u16, String>,
        f: (),
    }

    fn sample() -> S {
        S {
            a: 70_000,
            b: vec![
                E::A,
                E::B(300),
                E::C {
                    x: -5,
                    y: "é".into(),
                },
                E::D(1, Some(true)),
            ],
            c: ('ß', 1.5, -(1 << 100)),
            d: Some(vec![1, 2, 3]),
            e: (0..5).map(|i| (i * 100, format!("v{i}"))).collect(),
            f: (),
        }
    }

    #[test]
    fn canonical_bytes_are_bincode_bytes_for_ordered_values() {
        let standard = bincode::config::standard();
        let check = |v: &dyn erased::Check| assert!(v.same(), "{}", v.name());
        check(&sample());
        check(&0u8);
        check(&u64::MAX);
        check(&i16::MIN);
        check(&"text");
        check(&Some(E::A));
        check(&[E::B(1), E::B(2)]);
        check(&std::net::IpAddr::from([10, 0, 0, 1]));
        let bytes = canonical(&sample()).unwrap();
        assert_eq!(
            bytes,
            bincode::serde::encode_to_vec(sample(), standard).unwrap()
        );
    }

    #[test]
    fn canonical_bytes_ignore_map_order() {
        let a: HashMap<String, u32> = (0..50).map(|i| (format!("k{i}"), i)).collect();
        let mut b: HashMap<String, u32> = HashMap::new();
        for i in (0..50).rev() {
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(canonical(&a).unwrap(), canonical(&b).unwrap());
        b.insert("k0".into(), 99);
        assert_ne!(canonical(&a).unwrap(), canonical(&b).unwrap());
    }

    #[test]
    fn shape_ignores_data_and_order_but_not_structure() {
        assert_eq!(shape(&5u32).unwrap(), shape(&7u32).unwrap());
        assert_ne!(shape(&5u32).unwrap(), shape(&5u64).unwrap());
        assert_ne!(shape(&5u32).unwrap(), shape("").unwrap());
        assert_eq!(
            shape(&vec![E::A, E::B(1)]).unwrap(),
            shape(&vec![E::B(2), E::A, E::A]).unwrap()
        );
        assert_ne!(shape(&E::A).unwrap(), shape(&E::B(0)).unwrap());
        #[derive(Serialize)]
        struct P {
            x: u32,
            y: u32,
        }
        #[derive(Serialize)]
        struct Q {
            y: u32,
            x: u32,
        }
        assert_ne!(
            shape(&P { x: 1, y: 2 }).unwrap(),
            shape(&Q { y: 1, x: 2 }).unwrap()
        );
    }

    /// Compares canonical bytes with bincode's for values of any type in one list.
    mod erased {
        pub trait Check {
            fn same(&self) -> bool;
            fn name(&self) -> &'static str;
        }
        impl<T: serde::Serialize + ?Sized> Check for T {
            fn same(&self) -> bool {
                let standard = bincode::config::standard();
                super::canonical(self).ok() == bincode::serde::encode_to_vec(self, standard).ok()
            }
            fn name(&self) -> &'static str {
                std::any::type_name::<T>()
            }
        }
    }
}
