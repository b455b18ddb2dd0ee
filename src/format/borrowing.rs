//! A serde `Deserializer` adapter that reads owned strings and byte buffers from borrowed ones.
//!
//! bincode's serde decoder answers `deserialize_string` and `deserialize_byte_buf` by
//! allocating a zero-filled buffer and copying into it; `deserialize_str` and
//! `deserialize_bytes` hand out the bytes in place, and `String`'s and `ByteBuf`'s visitors
//! copy them once. Decoding a stored value through [`Borrowing`] turns the first pair into
//! the second, everywhere in the value (every nested seed, sequence, map, option, newtype and
//! enum is wrapped in turn), and forwards everything else untouched.
//!
//! Invariants: the adapter only changes which of the two equivalent requests reaches the
//! decoder for strings and byte buffers; every other call, answer and error passes through
//! unchanged. A visitor that accepts only owned strings (`visit_string`, not `visit_str`)
//! would refuse what it is handed here, so callers retry a failed decode without the adapter
//! (see `codec::decode`): a value that decodes either way is the same value.

use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use std::fmt;

/// The adapter around a deserializer.
pub(crate) struct Borrowing<D>(pub D);

/// A seed whose deserializer is wrapped.
pub(crate) struct Seed<S>(pub S);

struct Visit<V>(V);
struct Seq<A>(A);
struct Map<A>(A);
struct Enum<A>(A);
struct Variant<A>(A);

macro_rules! forward {
    ($($method:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
                self.0.$method(Visit(visitor))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Borrowing<D> {
    type Error = D::Error;

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_str(Visit(visitor))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.deserialize_bytes(Visit(visitor))
    }

    forward!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_bytes,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_unit_struct(name, Visit(visitor))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_newtype_struct(name, Visit(visitor))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple(len, Visit(visitor))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_tuple_struct(name, len, Visit(visitor))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_struct(name, fields, Visit(visitor))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_enum(name, variants, Visit(visitor))
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Borrowing(deserializer))
    }
}

macro_rules! visit {
    ($($method:ident($t:ty)),* $(,)?) => {
        $(
            fn $method<E: serde::de::Error>(self, v: $t) -> Result<Self::Value, E> {
                self.0.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Visit<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    visit!(
        visit_bool(bool),
        visit_i8(i8),
        visit_i16(i16),
        visit_i32(i32),
        visit_i64(i64),
        visit_i128(i128),
        visit_u8(u8),
        visit_u16(u16),
        visit_u32(u32),
        visit_u64(u64),
        visit_u128(u128),
        visit_f32(f32),
        visit_f64(f64),
        visit_char(char),
        visit_str(&str),
        visit_borrowed_str(&'de str),
        visit_string(String),
        visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]),
        visit_byte_buf(Vec<u8>),
    );

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_some(Borrowing(d))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.visit_newtype_struct(Borrowing(d))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.visit_seq(Seq(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(Map(map))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.0.visit_enum(Enum(data))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Seed(seed))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
    type Error = A::Error;
    type Variant = Variant<A::Variant>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), A::Error> {
        self.0
            .variant_seed(Seed(seed))
            .map(|(value, variant)| (value, Variant(variant)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Visit(visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.struct_variant(fields, Visit(visitor))
    }
}

#[cfg(test)]
mod tests {
    use crate::format::codec::{decode, encode, Codec};
    use serde::{Deserialize, Deserializer, Serialize};
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Plain,
        Named(String),
        Pair(String, #[serde(with = "serde_bytes_like")] Vec<u8>),
        Fields { note: Option<String> },
    }

    /// Bytes through `serialize_bytes` / `deserialize_byte_buf`, as `serde_bytes` does.
    mod serde_bytes_like {
        use serde::{Deserializer, Serializer};
        pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                    Ok(v)
                }
            }
            d.deserialize_byte_buf(V)
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Everything {
        text: String,
        empty: String,
        unicode: String,
        list: Vec<String>,
        map: BTreeMap<String, (u8, String)>,
        kinds: Vec<Kind>,
        nested: Option<Box<Everything>>,
        newtype: Wrapper,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Wrapper(String);

    fn everything(depth: u8) -> Everything {
        Everything {
            text: "receipt:ch_1N8vJkLq2eZvKYlo2C0fG8yZ".into(),
            empty: String::new(),
            unicode: "zß水🍌".repeat(100),
            list: vec!["a".into(), "bc".into(), String::new()],
            map: [
                ("k1".to_string(), (1, "v1".to_string())),
                ("k2".into(), (2, "".into())),
            ]
            .into_iter()
            .collect(),
            kinds: vec![
                Kind::Plain,
                Kind::Named("n".into()),
                Kind::Pair("p".into(), vec![0, 255, 7]),
                Kind::Fields {
                    note: Some("x".repeat(5000)),
                },
                Kind::Fields { note: None },
            ],
            nested: (depth > 0).then(|| Box::new(everything(depth - 1))),
            newtype: Wrapper("w".into()),
        }
    }

    thread_local! {
        static HANDED: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
    }

    /// A string that notes how the decoder handed it over.
    #[derive(Debug, PartialEq, Serialize)]
    struct Probe(String);

    impl<'de> Deserialize<'de> for Probe {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Probe;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Probe, E> {
                    HANDED.with(|h| h.set("borrowed"));
                    Ok(Probe(v.to_owned()))
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Probe, E> {
                    HANDED.with(|h| h.set("copied"));
                    Ok(Probe(v.to_owned()))
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Probe, E> {
                    HANDED.with(|h| h.set("owned"));
                    Ok(Probe(v))
                }
            }
            d.deserialize_string(V)
        }
    }

    /// The point of the adapter: a stored string reaches its visitor in place, not as the
    /// owned buffer bincode's plain decoder fills.
    #[test]
    fn a_replay_hands_strings_over_in_place() {
        let bytes =
            bincode::serde::encode_to_vec(Probe("x".repeat(64)), bincode::config::standard())
                .unwrap();
        let (plain, _): (Probe, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(
            HANDED.with(|h| h.get()),
            "owned",
            "the plain decoder, for contrast"
        );
        let through: Probe = decode(&bytes, Codec::Bincode, None).unwrap();
        assert_eq!(HANDED.with(|h| h.get()), "borrowed");
        assert_eq!(through, plain);
    }

    #[test]
    fn values_decode_the_same_through_the_adapter() {
        let value = everything(2);
        let encoded = encode(&value, Codec::Bincode, usize::MAX).expect("encodes");
        let through: Everything =
            decode(&encoded.bytes, Codec::Bincode, Some(encoded.shape)).expect("decodes");
        assert_eq!(through, value);
        let config = bincode::config::standard();
        let (plain, _): (Everything, usize) =
            bincode::serde::decode_from_slice(&encoded.bytes, config).unwrap();
        assert_eq!(plain, through);
    }

    /// A type whose visitor takes only owned strings: the adapter hands it a borrowed one, which
    /// it refuses; the plain decoder is used instead, and the value is the same.
    #[derive(Debug, PartialEq, Serialize)]
    struct OwnedOnly(String);

    impl<'de> Deserialize<'de> for OwnedOnly {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            // The misuse is the point: such visitors exist in the wild.
            #[allow(clippy::serde_api_misuse)]
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = OwnedOnly;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an owned string")
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<OwnedOnly, E> {
                    Ok(OwnedOnly(v))
                }
            }
            d.deserialize_string(V)
        }
    }

    #[test]
    fn a_visitor_that_takes_only_owned_strings_still_decodes() {
        let bytes =
            bincode::serde::encode_to_vec(OwnedOnly("owned".into()), bincode::config::standard())
                .unwrap();
        let value: OwnedOnly = decode(&bytes, Codec::Bincode, None).expect("falls back");
        assert_eq!(value, OwnedOnly("owned".into()));
    }
}
