// Drives Debian's Chromium through playwright-core: signs in, labels every scenario of
// a job waiting for labels by choosing classes on its page, submits, waits for the
// report, and prints what the report page shows as one JSON line. A screenshot of each
// page visited goes to SHOTS. Called by cli/tests/web.rs; settings come from the
// environment: PLAYWRIGHT_CORE (module path), CHROMIUM, BASE, JOB, TOKEN, LABELS
// (JSON {"<scenario id>": <class id> | "discard"}), SHOTS, PROFILE (a fresh folder).
const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};

(async () => {
  const base = env("BASE"), job = env("JOB"), shots = env("SHOTS");
  const labels = JSON.parse(env("LABELS"));
  const context = await chromium.launchPersistentContext(env("PROFILE"), {
    executablePath: env("CHROMIUM"),
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    viewport: { width: 1280, height: 900 },
  });
  const page = context.pages()[0] || (await context.newPage());
  const shot = (name) => page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
  const out = { steps: [] };
  try {
    // 1. the job page without the token: 401 and a sign-in form
    let resp = await page.goto(`${base}/jobs/${job}`);
    out.unauthenticated_status = resp.status();
    await shot("01-sign-in");
    // a wrong token is refused
    await page.fill("input[name=token]", "not-the-token");
    await Promise.all([page.waitForLoadState(), page.click("button[type=submit]")]);
    out.wrong_token_text = (await page.textContent(".error")) || "";
    await shot("02-wrong-token");
    // the right one leads back to the job
    await page.fill("input[name=token]", env("TOKEN"));
    await Promise.all([page.waitForURL(`**/jobs/${job}`), page.click("button[type=submit]")]);
    out.state_before = (await page.textContent("#job-state")).trim();
    await shot("03-awaiting-labels");

    // 2. label each scenario: click its control, choose the class
    const selects = await page.$$("select[name^=scenario-]");
    out.scenarios_on_page = selects.length;
    for (const [sid, cls] of Object.entries(labels)) {
      await page.click(`#label-${sid}`);
      await page.selectOption(`#label-${sid}`, String(cls));
    }
    await shot("04-labelled");
    await Promise.all([page.waitForURL(`**/jobs/${job}`), page.click("#submit-labels")]);
    await shot("05-submitted");

    // 3. wait for correction and the report
    const deadline = Date.now() + 300_000;
    let state = "";
    while (Date.now() < deadline) {
      state = (await page.textContent("#job-state")).trim();
      if (["done", "failed", "cancelled"].includes(state)) break;
      await page.waitForTimeout(1000);
      await page.reload();
    }
    out.state_after = state;
    await shot("06-report");
    if (state === "done") {
      for (const id of ["test-before", "test-after", "scenario-before", "scenario-after"]) {
        out[id] = (await page.textContent(`#${id}`)).trim();
      }
    }
    await page.goto(`${base}/`);
    out.jobs_page_lists_job = (await page.textContent("body")).includes(job);
    await shot("07-jobs");
  } finally {
    await context.close();
  }
  console.log(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
