//! Median, minimum and maximum of repeated measurements: what the benchmark prints.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// None for no samples. NaN samples (a round that measured nothing) are left out.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// Each sample divided by `base`'s median.
    pub fn ratio_to(samples: &[f64], base: &Summary) -> Option<Self> {
        let ratios: Vec<f64> = samples.iter().map(|s| s / base.median).collect();
        Self::of(&ratios)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn nothing_to_summarise() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
    }

    #[test]
    fn ratios_divide_by_the_base_median() {
        let base = Summary::of(&[100.0, 200.0, 300.0]).unwrap();
        let r = Summary::ratio_to(&[190.0, 200.0, 210.0], &base).unwrap();
        assert_eq!((r.median, r.min, r.max), (1.0, 0.95, 1.05));
    }
}
