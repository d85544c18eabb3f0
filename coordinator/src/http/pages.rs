//! The labelling page's HTML, as maud templates: every value spliced in is escaped by
//! the template engine (`(x)`), and nothing is written as raw HTML but the constant
//! style sheet. The handlers in `mod.rs` fetch the data; these functions only render.
use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::CSRF_FIELD;
use defuse_core::report::Summary;
use defuse_core::scenarios::Scenario;
use defuse_proto::JobStatus;

const STYLE: &str = r#"
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1b1b1b; max-width: 70rem; }
header a { color: inherit; text-decoration: none; font-weight: 600; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .6rem; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scenarios { display: grid; grid-template-columns: repeat(auto-fill, minmax(16rem, 1fr)); gap: 1rem; }
.scenario { border: 1px solid #ccc; border-radius: 6px; padding: .6rem; }
.scenario img { width: 100%; image-rendering: pixelated; background: #000; }
.scenario h3 { margin: 0 0 .4rem; font-size: 1rem; }
.preds { font-family: ui-monospace, monospace; font-size: .8rem; word-break: break-word; }
.error { color: #a00; font-weight: 600; }
.state { font-weight: 600; }
button { font-size: 1rem; padding: .4rem 1rem; }
select:focus, button:focus, a:focus { outline: 3px solid #36c; }
"#;

/// A whole page: the header, the title, `body`.
pub(super) fn page(title: &str, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Defuse" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { a href="/" { "Defuse" } }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
    .into_string()
}

pub(super) fn login_form(message: &str, next: &str) -> Markup {
    html! {
        p.error { (message) }
        form method="post" action="/login" {
            input type="hidden" name="next" value=(next);
            label { "Token " input type="password" name="token" autofocus required; }
            button type="submit" { "Sign in" }
        }
    }
}

/// An error (or a refusal) with a way back.
pub(super) fn alert(message: &str, back: &str) -> Markup {
    html! {
        p.error role="alert" { (message) }
        p { a href=(back) { "Back" } }
    }
}

/// One row of the job list.
pub(super) struct JobRow {
    pub id: String,
    pub name: String,
    pub state: &'static str,
    pub step: String,
    /// "done / total" of identify's shards, when it has some.
    pub shards: String,
}

/// The job list: a page of jobs, the link to the next page (after `next`), and the
/// sign-out form for a signed-in session (its CSRF token).
pub(super) fn jobs(
    rows: &[JobRow],
    first_page: bool,
    next: Option<(&str, usize)>,
    csrf: Option<&str>,
) -> Markup {
    html! {
        table {
            thead { tr { th { "Job" } th { "Name" } th { "State" } th { "Step" } th { "Shards done" } } }
            tbody {
                @for r in rows {
                    tr {
                        td { a href={ "/jobs/" (r.id) } { (r.id) } }
                        td { (r.name) }
                        td.state { (r.state) }
                        td { (r.step) }
                        td.num { (r.shards) }
                    }
                }
            }
        }
        @if rows.is_empty() && first_page {
            p { "No jobs yet: submit one with " code { "defuse submit job.toml" } "." }
        }
        @if let Some((after, limit)) = next {
            p { a href={ "/?after=" (after) "&limit=" (limit) } id="next-page" { "More jobs" } }
        }
        @if let Some(csrf) = csrf {
            form method="post" action="/logout" {
                input type="hidden" name=(CSRF_FIELD) value=(csrf);
                button type="submit" id="sign-out" { "Sign out" }
            }
        }
    }
}

/// A job's state, steps and shards, then `below` (the label form or the report).
pub(super) fn job(st: &JobStatus, below: Markup) -> Markup {
    html! {
        p {
            "Name " b { (st.name) }
            " · state " span.state id="job-state" { (st.state) }
            " · step " (st.step)
        }
        @if !st.error.is_empty() {
            p.error { (st.error) }
        }
        table {
            thead { tr { th { "Step" } th { "State" } th { "Shards (done / leased / pending / failed of total)" } } }
            tbody {
                @for s in &st.steps {
                    tr {
                        td { (s.step) }
                        td { (s.state) }
                        td {
                            @if s.shards_total > 0 {
                                (format!("{} / {} / {} / {} of {}", s.shards_done, s.shards_leased, s.shards_pending, s.shards_failed, s.shards_total))
                            }
                            @if !s.detail.is_empty() {
                                " (" (s.detail) ")"
                            }
                        }
                    }
                }
            }
        }
        (below)
    }
}

fn class_name(classes: &[String], c: i64) -> String {
    usize::try_from(c)
        .ok()
        .and_then(|i| classes.get(i))
        .cloned()
        .unwrap_or_else(|| c.to_string())
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// [`pct`], or a dash where there is nothing to measure.
fn opct(x: Option<f64>) -> String {
    x.map_or("–".to_string(), pct)
}

/// The form that labels a job's scenarios: a card per scenario (its samples, the
/// classifier's predictions on them, the nearest real training images) with a class
/// picker; the session's CSRF token (empty for a bearer or an open coordinator).
pub(super) fn label_form(
    job: &str,
    csrf: &str,
    scenarios: &[Scenario],
    classes: &[String],
) -> Markup {
    html! {
        h2 { "Label the failure scenarios" }
        p {
            "Each scenario is a cluster of inputs the classifier gets wrong. First, some of its
own failures: real images above, and below each the perturbed version the classifier
got wrong. Then samples of the scenario's Gaussian (the paper's picture), with the
classifier's prediction on each (row by row). Give each scenario the class a person
would see, or discard it (not a failure, or unclear). Tab moves between scenarios;
type to pick a class."
        }
        form method="post" action={ "/jobs/" (job) "/labels" } id="labels" {
            input type="hidden" name=(CSRF_FIELD) value=(csrf);
            div.scenarios {
                @for (i, s) in scenarios.iter().enumerate() {
                    @let preds: Vec<String> = s.sample_predictions.iter().map(|&p| class_name(classes, p)).collect();
                    @let sources = {
                        let mut by_count: Vec<(&i64, &usize)> = s.source_labels.iter().collect();
                        by_count.sort_by_key(|(l, n)| (std::cmp::Reverse(**n), **l));
                        by_count
                            .iter()
                            .map(|(l, n)| format!("{} ×{n}", class_name(classes, **l)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    section.scenario id={ "scenario-" (s.id) } {
                        h3 { "Scenario " (s.id) }
                        @if !s.examples.is_empty() {
                            img.failures src={ "/jobs/" (job) "/scenarios/" (s.id) "/failures.png" } alt={ "failures of scenario " (s.id) };
                            p.preds {
                                "labelled → read as (column by column): "
                                (s.examples.iter().map(|e| format!("{} → {}", class_name(classes, e.label), class_name(classes, e.predicted))).collect::<Vec<_>>().join(", "))
                            }
                        }
                        img src={ "/jobs/" (job) "/scenarios/" (s.id) "/grid.png" } alt={ "samples of scenario " (s.id) };
                        p.preds { "predicted (row by row): " (preds.join(" ")) }
                        p { "Nearest real training images:" }
                        img.nearest src={ "/jobs/" (job) "/scenarios/" (s.id) "/nearest.png" } alt={ "training images nearest scenario " (s.id) };
                        p {
                            (s.size) " failures · weight " (format!("{:.3}", s.weight))
                            " · mostly predicted " b { (class_name(classes, s.predicted)) }
                            br;
                            "source images labelled: " (sources)
                        }
                        label {
                            "Label "
                            select name={ "scenario-" (s.id) } id={ "label-" (s.id) } required autofocus[i == 0] {
                                option value="" selected { "choose…" }
                                option value="discard" { "discard" }
                                @for (c, name) in classes.iter().enumerate() {
                                    option value=(c) { (c) ": " (name) }
                                }
                            }
                        }
                    }
                }
            }
            p { button type="submit" id="submit-labels" { "Submit labels and correct the classifier" } }
        }
    }
}

/// A finished job's report: the accuracies before and after, and each scenario.
pub(super) fn report(job: &str, summary: Result<Summary, String>) -> Markup {
    let s = match summary {
        Ok(s) => s,
        Err(e) => return html! { p.error { "report: " (e) } },
    };
    html! {
        h2 { "Report" }
        table id="report" {
            thead { tr { th {} th { "before" } th { "after" } } }
            tbody {
                tr {
                    td { "test accuracy" }
                    td.num id="test-before" { (pct(s.test_accuracy_before)) }
                    td.num id="test-after" { (pct(s.test_accuracy_after)) }
                }
                @if let Some(u) = &s.test_unsearched {
                    tr {
                        td { "test accuracy on the " (u.images) " test images not searched" }
                        td.num id="unsearched-before" { (opct(u.accuracy_before)) }
                        td.num id="unsearched-after" { (opct(u.accuracy_after)) }
                    }
                }
                tr {
                    td { "real images inside the labelled scenarios (" (s.real_members_labelled.images) ")" }
                    td.num id="real-before" { (opct(s.real_members_labelled.accuracy_before)) }
                    td.num id="real-after" { (opct(s.real_members_labelled.accuracy_after)) }
                }
                tr {
                    td { "failure-scenario accuracy (" (s.scenario_test_samples) " held-out synthetic samples)" }
                    td.num id="scenario-before" { (pct(s.scenario_accuracy_before)) }
                    td.num id="scenario-after" { (pct(s.scenario_accuracy_after)) }
                }
            }
        }
        p {
            (s.n_images_searched) " images searched, " (s.n_perturbations) " perturbations, "
            (s.n_failures) " failures from " (s.n_images_with_failure) " images; "
            (s.n_scenarios) " scenarios, " (s.n_labelled) " labelled, " (s.n_discarded) " discarded."
        }
        div.scenarios {
            @for sc in &s.scenarios {
                section.scenario {
                    h3 { "Scenario " (sc.id) ": " (sc.label_name.as_deref().unwrap_or("discarded")) }
                    img src={ "/jobs/" (job) "/scenarios/" (sc.id) "/grid.png" } alt={ "samples of scenario " (sc.id) };
                    p {
                        (sc.size) " failures · was read as " (sc.predicted_name) " · "
                        @if let (Some(a), Some(z)) = (sc.accuracy_before, sc.accuracy_after) {
                            "accuracy " (pct(a)) " → " (pct(z))
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What comes from the data (job names, errors, class names) is escaped wherever
    /// it lands: text, attribute values, the title.
    #[test]
    fn values_from_the_data_are_escaped() {
        let evil = r#"<script>alert("x")</script> & 'y'"#;
        let html = page(evil, alert(evil, evil));
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; 'y'"));
        assert!(
            html.contains(r#"href="&lt;script&gt;alert(&quot;x&quot;)"#),
            "{html}"
        );
        let row = JobRow {
            id: "a\"b".into(),
            name: evil.into(),
            state: "queued",
            step: "models".into(),
            shards: String::new(),
        };
        let list = jobs(&[row], true, Some(("a\"b", 10)), Some("t\"k")).into_string();
        assert!(!list.contains("<script>"), "{list}");
        assert!(list.contains(r#"href="/jobs/a&quot;b""#), "{list}");
        assert!(list.contains(r#"value="t&quot;k""#), "{list}");
        let scen = Scenario {
            id: 3,
            component: 0,
            weight: 0.5,
            size: 4,
            mean: vec![],
            covariance: vec![],
            predicted: 1,
            source_labels: [(0, 2)].into(),
            sample_predictions: vec![0, 1],
            examples: vec![defuse_core::scenarios::Example {
                source: 12,
                label: 1,
                predicted: 0,
            }],
        };
        let form =
            label_form("j", "", &[scen], &["<b>zero</b>".into(), "one".into()]).into_string();
        assert!(!form.contains("<b>zero</b>"), "{form}");
        assert!(form.contains("&lt;b&gt;zero&lt;/b&gt;"), "{form}");
        assert!(
            form.contains("/jobs/j/scenarios/3/failures.png")
                && form.contains("column by column): one → &lt;b&gt;zero&lt;/b&gt;"),
            "{form}"
        );
        assert!(
            form.contains(r#"name="scenario-3""#) && form.contains("autofocus"),
            "{form}"
        );
    }
}
