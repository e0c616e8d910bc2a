//! `sluice top` on a terminal: the model of [`crate::top`] drawn with ratatui, a second
//! apart. Keys: `q` (or Esc, Ctrl-C) quits and restores the terminal, `s` sorts the
//! stages (pipeline order, busiest, most rows), Tab switches to the next pipeline.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Sparkline, Table};

use crate::top::{Model, PipelineView, Process, STAGE_HEADER};

/// Lag points kept per partition for its sparkline.
const HISTORY: usize = 60;

#[derive(Clone, Copy)]
enum Sort {
    Pipeline,
    Busy,
    Rows,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Pipeline => Sort::Busy,
            Sort::Busy => Sort::Rows,
            Sort::Rows => Sort::Pipeline,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sort::Pipeline => "pipeline order",
            Sort::Busy => "busiest first",
            Sort::Rows => "most rows first",
        }
    }
}

pub(crate) async fn run(
    client: &reqwest::Client,
    given: &[String],
    processes: &mut BTreeMap<String, Process>,
) -> anyhow::Result<()> {
    let model = Model { client, given };
    let mut terminal = ratatui::try_init()?;
    let result = ui(&model, processes, &mut terminal).await;
    ratatui::try_restore()?;
    result
}

async fn ui(
    model: &Model<'_>,
    processes: &mut BTreeMap<String, Process>,
    terminal: &mut ratatui::DefaultTerminal,
) -> anyhow::Result<()> {
    let mut sort = Sort::Pipeline;
    let mut selected = 0;
    let mut history: BTreeMap<(String, String), VecDeque<u64>> = BTreeMap::new();
    loop {
        let (mut pipelines, errors) = model.refresh(processes).await;
        for p in &pipelines {
            for (partition, lag, _, _) in &p.partitions {
                let points = history
                    .entry((p.name.clone(), partition.clone()))
                    .or_default();
                points.push_back(*lag as u64);
                while points.len() > HISTORY {
                    points.pop_front();
                }
            }
        }
        selected = selected.min(pipelines.len().saturating_sub(1));
        let mut next_read = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(p) = pipelines.get_mut(selected) {
                sort_stages(p, sort);
            }
            terminal.draw(|frame| {
                draw(
                    frame,
                    pipelines.get(selected),
                    pipelines.len(),
                    &errors,
                    sort,
                    &history,
                )
            })?;
            let wait = next_read.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                break;
            }
            // Keys between reads (a short blocking poll: this is the CLI's own thread).
            if event::poll(wait.min(Duration::from_millis(100)))?
                && let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(());
                    }
                    KeyCode::Char('s') => sort = sort.next(),
                    KeyCode::Tab => selected = (selected + 1) % pipelines.len().max(1),
                    _ => {}
                }
                next_read = next_read.max(Instant::now());
            }
        }
    }
}

fn sort_stages(p: &mut PipelineView, sort: Sort) {
    match sort {
        Sort::Pipeline => {}
        Sort::Busy => p.stages.sort_by(|a, b| b.busy.total_cmp(&a.busy)),
        Sort::Rows => p.stages.sort_by(|a, b| b.rows_in.total_cmp(&a.rows_in)),
    }
}

fn draw(
    frame: &mut ratatui::Frame,
    pipeline: Option<&PipelineView>,
    pipelines: usize,
    errors: &[String],
    sort: Sort,
    history: &BTreeMap<(String, String), VecDeque<u64>>,
) {
    let Some(p) = pipeline else {
        let mut text = vec![Line::from("sluice top: waiting for a pipeline to answer…")];
        text.extend(
            errors
                .iter()
                .map(|e| Line::from(format!("unreachable: {e}"))),
        );
        text.push(Line::from("q quits"));
        frame.render_widget(Paragraph::new(text), frame.area());
        return;
    };
    let header_lines = 1 + p.members.len() + usize::from(p.decision.is_some()) + errors.len();
    let [head, stages, rest, keys] = Layout::vertical([
        Constraint::Length(header_lines as u16),
        Constraint::Length(p.stages.len() as u16 + 3 + 1 + p.outputs.len() as u16),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let mut lines = vec![Line::styled(
        format!("pipeline {} ({} of {pipelines})", p.name, 1),
        Style::default().add_modifier(Modifier::BOLD),
    )];
    lines.extend(p.members.iter().map(|m| Line::from(format!("process {m}"))));
    if let Some(d) = &p.decision {
        lines.push(Line::from(format!("autoscaler: {d}")));
    }
    lines.extend(
        errors
            .iter()
            .map(|e| Line::from(format!("unreachable: {e}"))),
    );
    frame.render_widget(Paragraph::new(lines), head);

    let widths = [Constraint::Min(12)]
        .into_iter()
        .chain([Constraint::Length(9); 10])
        .collect::<Vec<_>>();
    let mut rows: Vec<Row> = p
        .stages
        .iter()
        .map(|r| Row::new(r.cells.to_vec()))
        .collect();
    rows.push(Row::new(vec![p.source.clone()]));
    rows.extend(p.outputs.iter().map(|o| Row::new(vec![o.clone()])));
    let table = Table::new(rows, widths)
        .header(
            Row::new(STAGE_HEADER.to_vec()).style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(format!(" stages ({}) ", sort.name())));
    frame.render_widget(table, stages);

    // Partitions: lag now, and its last minute as a sparkline.
    let block = Block::bordered().title(" partitions: lag ");
    let inner = block.inner(rest);
    frame.render_widget(block, rest);
    let shown = p.partitions.iter().take(inner.height as usize);
    for (i, (partition, lag, unit, addr)) in shown.enumerate() {
        let line = ratatui::layout::Rect {
            y: inner.y + i as u16,
            height: 1,
            ..inner
        };
        let [label, spark] =
            Layout::horizontal([Constraint::Length(48), Constraint::Min(10)]).areas(line);
        frame.render_widget(
            Paragraph::new(format!(
                "{partition:<20} {:>10} {unit:<7} {addr}",
                *lag as u64
            )),
            label,
        );
        if let Some(points) = history.get(&(p.name.clone(), partition.clone())) {
            let data: Vec<u64> = points.iter().copied().collect();
            frame.render_widget(Sparkline::default().data(&data), spark);
        }
    }
    frame.render_widget(
        Paragraph::new("q quit  s sort stages  tab next pipeline"),
        keys,
    );
}
