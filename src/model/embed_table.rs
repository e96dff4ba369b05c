//! The token embedding table, kept in the block format it is stored in (Q8_0, Q6_K, ...) and dequantized a
//! row at a time for the tokens of a step: a step reads at most a few hundred rows, and a dequantized table is
//! 4 bytes a value (Gemma 3's 262,144 x 640 would be 640 MiB of f32 beside 170 MiB as stored). The rows come
//! out bit for bit as dequantizing the whole table would give them.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};

use super::ModelError;

/// An embedding table in its stored format.
pub struct EmbedTable {
    data: Vec<u8>,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl EmbedTable {
    /// Keeps `t` (`[vocab, hidden]`) as stored.
    pub fn new(t: &QTensor) -> Result<Self, ModelError> {
        let (rows, cols) = t.shape().dims2()?;
        let dtype = t.dtype();
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(ModelError::Metadata(format!(
                "token_embd.weight rows of {cols} values do not split into {dtype:?} blocks"
            )));
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let data = t.data()?.into_owned();
        if data.len() != rows * row_bytes {
            return Err(ModelError::Metadata(format!(
                "token_embd.weight holds {} bytes, not {rows} rows of {row_bytes}",
                data.len()
            )));
        }
        Ok(Self {
            data,
            dtype,
            rows,
            cols,
            row_bytes,
        })
    }

    /// The rows of `ids` as f32, `[ids.len(), hidden]`. Ids must be below the vocabulary size.
    pub fn rows(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token id {id} is outside the embedding table")
            }
            let bytes = &self.data[id * self.row_bytes..(id + 1) * self.row_bytes];
            let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, self.dtype)?;
            let row = QTensor::new(storage, (1, self.cols))?.dequantize(&Device::Cpu)?;
            out.extend(row.flatten_all()?.to_vec1::<f32>()?);
        }
        Tensor::from_vec(out, (ids.len(), self.cols), &Device::Cpu)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_the_whole_tables_rows_bit_for_bit() {
        let (vocab, hidden) = (50, 64);
        let values: Vec<f32> = (0..vocab * hidden).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let full = Tensor::from_vec(values, (vocab, hidden), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::F16, GgmlDType::F32] {
            let q = QTensor::quantize(&full, dtype).unwrap();
            let whole: Vec<Vec<f32>> = q.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            let table = EmbedTable::new(&q).unwrap();
            let ids = [7u32, 0, 49, 7];
            let got: Vec<Vec<f32>> = table.rows(&ids).unwrap().to_vec2().unwrap();
            for (row, &id) in got.iter().zip(&ids) {
                assert!(*row == whole[id as usize], "{dtype:?} row {id}");
            }
            assert!(table.rows(&[50]).is_err(), "{dtype:?}: past the vocabulary");
        }
    }
}
