//! A pipeline as a graph: what each stage and each output reads.
//!
//! ```text
//!                ┌─► stage 1 (filter) ─────────► output 0 (alerts)
//!  source ─► 0 ──┼─► stage 2 (aggregate) ──────► output 1 (counts)
//!                └──────────────────────────────► output 2 (raw)
//! ```
//! Stages are kept in a topological order (every stage reads the source or stages before
//! it), so a worker runs a batch through them once, front to back, and each stage's rows
//! are handed to every stage and output that reads them: the same Arrow arrays, shared,
//! never copied. A chain (each stage reads the one before, one output reads the last) is
//! the graph of every pipeline that names no inputs.

/// Where a stage or an output takes its rows from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// The batches the source reads.
    Source,
    /// The rows a stage produces (by its index in `Pipeline::stages`).
    Stage(usize),
}

/// What every stage and output reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// Per stage, in the order of `Pipeline::stages`: its inputs, each the source or an
    /// earlier stage.
    pub stages: Vec<Vec<Input>>,
    /// Per output, in the order of `Pipeline::outputs`: its inputs.
    pub outputs: Vec<Vec<Input>>,
}

impl Graph {
    /// `stages` stages in a row, the first reading the source, and one output reading the
    /// last (the source when there are none).
    pub fn chain(stages: usize) -> Self {
        let input = |i: usize| match i {
            0 => Input::Source,
            i => Input::Stage(i - 1),
        };
        Graph {
            stages: (0..stages).map(|i| vec![input(i)]).collect(),
            outputs: vec![vec![input(stages)]],
        }
    }

    /// Checks that every stage reads only the source or stages before it, and that every
    /// stage's rows go somewhere: what the executor relies on (an output that reads
    /// nothing gets nothing). The configuration reports
    /// these mistakes with their lines before a graph is built; this is the last guard.
    pub fn check(&self) -> Result<(), String> {
        for (i, inputs) in self.stages.iter().enumerate() {
            if inputs.is_empty() {
                return Err(format!("stage {i} reads nothing"));
            }
            if let Some(Input::Stage(j)) = inputs
                .iter()
                .find(|x| matches!(x, Input::Stage(j) if *j >= i))
            {
                return Err(format!("stage {i} reads stage {j}, which is not before it"));
            }
        }
        for (o, inputs) in self.outputs.iter().enumerate() {
            if let Some(Input::Stage(j)) = inputs
                .iter()
                .find(|x| matches!(x, Input::Stage(j) if *j >= self.stages.len()))
            {
                return Err(format!("output {o} reads stage {j}, which does not exist"));
            }
        }
        if self.outputs.is_empty() {
            return Err("the pipeline has no output".into());
        }
        for i in 0..self.stages.len() {
            if self.readers_of(Input::Stage(i)).next().is_none()
                && self.outputs_of(Input::Stage(i)).next().is_none()
            {
                return Err(format!("the rows of stage {i} go nowhere"));
            }
        }
        Ok(())
    }

    /// The stages that read `input`.
    pub fn readers_of(&self, input: Input) -> impl Iterator<Item = usize> + '_ {
        (0..self.stages.len()).filter(move |&i| self.stages[i].contains(&input))
    }

    /// The outputs that read `input`.
    pub fn outputs_of(&self, input: Input) -> impl Iterator<Item = usize> + '_ {
        (0..self.outputs.len()).filter(move |&o| self.outputs[o].contains(&input))
    }

    /// The graph from stage `first` on, as if the source gave what `first` reads: the
    /// stages `first` leads to (kept in order, renumbered from 0) and the outputs it
    /// reaches; the indices of the stages kept. For re-driving dead letters of `first`.
    pub fn from_stage(&self, first: usize) -> (Graph, Vec<usize>) {
        let mut kept = vec![first];
        for i in first + 1..self.stages.len() {
            if self.stages[i]
                .iter()
                .any(|x| matches!(x, Input::Stage(j) if kept.contains(j)))
            {
                kept.push(i);
            }
        }
        let renumber = |x: &Input| match x {
            Input::Stage(j) => kept.iter().position(|k| k == j).map(Input::Stage),
            Input::Source => None,
        };
        let mut stages: Vec<Vec<Input>> = kept
            .iter()
            .map(|&i| self.stages[i].iter().filter_map(renumber).collect())
            .collect();
        stages[0] = vec![Input::Source];
        let outputs = self
            .outputs
            .iter()
            .map(|inputs| inputs.iter().filter_map(renumber).collect())
            .collect();
        (Graph { stages, outputs }, kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Input::*;

    #[test]
    fn a_chain_reads_each_stage_from_the_one_before() {
        let g = Graph::chain(2);
        assert_eq!(g.stages, vec![vec![Source], vec![Stage(0)]]);
        assert_eq!(g.outputs, vec![vec![Stage(1)]]);
        assert!(g.check().is_ok());
        assert_eq!(Graph::chain(0).outputs, vec![vec![Source]]);
    }

    #[test]
    fn checks_order_and_that_rows_go_somewhere() {
        let g = Graph {
            stages: vec![vec![Stage(1)], vec![Source]],
            outputs: vec![vec![Stage(0)]],
        };
        assert!(g.check().unwrap_err().contains("not before it"));
        let g = Graph {
            stages: vec![vec![Source], vec![Source]],
            outputs: vec![vec![Stage(0)]],
        };
        assert!(g.check().unwrap_err().contains("go nowhere"));
    }

    #[test]
    fn the_graph_from_a_stage_keeps_what_it_leads_to() {
        // source → 0 → {1 → out 0, 2 → out 1}; source → 3 → out 2
        let g = Graph {
            stages: vec![vec![Source], vec![Stage(0)], vec![Stage(0)], vec![Source]],
            outputs: vec![vec![Stage(1)], vec![Stage(2)], vec![Stage(3)]],
        };
        let (from, kept) = g.from_stage(2);
        assert_eq!(kept, vec![2]);
        assert_eq!(from.stages, vec![vec![Source]]);
        assert_eq!(from.outputs, vec![vec![], vec![Stage(0)], vec![]]);
        let (from, kept) = g.from_stage(0);
        assert_eq!(kept, vec![0, 1, 2]);
        assert_eq!(from.outputs, vec![vec![Stage(1)], vec![Stage(2)], vec![]]);
    }
}
