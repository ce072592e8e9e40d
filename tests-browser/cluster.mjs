// Opens Baton's dashboard in headless Chromium (Debian's, driven by playwright-core) on a
// node of a cluster, waits until the cluster section lists NODES nodes and SUSPENDED shared
// suspensions, and prints what it shows; saves a screenshot.
// Usage: node cluster.mjs URL SCREENSHOT.png NODES SUSPENDED
import { launch } from "./browser.mjs";

const [url, screenshot, nodes, suspended] = process.argv.slice(2);
const browser = await launch();
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  await page.waitForFunction(([n, s]) =>
    document.querySelectorAll("#nodes tr").length >= n
      && document.querySelectorAll("#fleet-suspensions tr").length >= s,
    [Number(nodes), Number(suspended)], { timeout: 60000 });
  const rows = id => page.$$eval(`#${id} tr`, trs => trs.map(tr =>
    [...tr.querySelectorAll("td")].map(td => td.innerText)));
  const shown = {
    hidden: await page.$eval("#cluster", s => s.hidden),
    heading: await page.textContent("#cluster-redis"),
    nodes: await rows("nodes"),
    suspensions: await rows("fleet-suspensions"),
  };
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(shown));
} finally {
  await browser.close();
}
