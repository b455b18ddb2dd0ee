//! Fields gathered into one buffer for one hash call, on the stack while they fit.
//!
//! Invariants: [`Gather::as_slice`] is every byte pushed, in order, whether they fit on the
//! stack or moved to the heap; a field is its length (8 bytes, little-endian) then its bytes,
//! so no two sequences of fields gather to the same bytes.

/// Bytes kept on the stack before moving to the heap: a request's method, path, query and a
/// small body fit.
const STACK: usize = 512;

/// A buffer of gathered fields.
pub(crate) struct Gather {
    stack: [u8; STACK],
    len: usize,
    heap: Option<Vec<u8>>,
}

impl Gather {
    pub(crate) fn new() -> Self {
        Self {
            stack: [0; STACK],
            len: 0,
            heap: None,
        }
    }

    /// Appends `bytes` as they are.
    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        if let Some(heap) = &mut self.heap {
            heap.extend_from_slice(bytes);
        } else if let Some(room) = self.stack.get_mut(self.len..self.len + bytes.len()) {
            room.copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            let mut heap = Vec::with_capacity(2 * (self.len + bytes.len()));
            heap.extend_from_slice(&self.stack[..self.len]);
            heap.extend_from_slice(bytes);
            self.heap = Some(heap);
        }
    }

    /// Appends a field: its length, then its bytes.
    pub(crate) fn field(&mut self, bytes: &[u8]) {
        self.raw(&(bytes.len() as u64).to_le_bytes());
        self.raw(bytes);
    }

    /// Everything appended.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match &self.heap {
            Some(heap) => heap,
            None => &self.stack[..self.len],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_bytes_are_the_fields_in_order_on_the_stack_or_the_heap() {
        for sizes in [
            &[0usize, 3, 7][..],
            &[500, 4, 20],
            &[511],
            &[512],
            &[513, 1],
            &[2000],
        ] {
            let mut gather = Gather::new();
            let mut expected = Vec::new();
            for (i, &size) in sizes.iter().enumerate() {
                let field = vec![i as u8 + 1; size];
                gather.field(&field);
                expected.extend_from_slice(&(size as u64).to_le_bytes());
                expected.extend_from_slice(&field);
            }
            assert_eq!(gather.as_slice(), expected.as_slice(), "{sizes:?}");
        }
    }
}
