// Copies the pinned front-end dependencies (package-lock.json) into the Python package, each as
// one ES module beside its licence, so `pip install` alone serves a working page. Run after
// `npm ci`: `npm run vendor`. The output is committed; tests/browser/test_js_protocol.py checks
// its VERSIONS.txt against package.json and the lock, and that each licence is there.
import { mkdirSync, readFileSync, writeFileSync, copyFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "node_modules");
const out = join(here, "..", "meshagent_gui", "server", "web", "vendor");

const version = (name) => JSON.parse(readFileSync(join(modules, name, "package.json"), "utf8")).version;

// A UMD bundle as an ES module: its CommonJS branch fills a local `module.exports`.
function umdAsModule(name, file, exportsList) {
  const code = readFileSync(join(modules, name, file), "utf8").replace(/\/\/# sourceMappingURL=.*$/m, "");
  const names = exportsList.map((e) => `export const ${e} = module.exports.${e};`).join("\n");
  return `// ${name} ${version(name)} (${file}), wrapped as an ES module by web/vendor.mjs.\n` +
    `const module = { exports: {} };\nconst exports = module.exports;\n${code}\n${names}\n`;
}

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
writeFileSync(join(out, "msgpack.mjs"),
  umdAsModule("@msgpack/msgpack", "dist.umd/msgpack.min.js", ["encode", "decode", "Encoder", "Decoder", "DecodeError"]));
writeFileSync(join(out, "blake3.mjs"),
  umdAsModule("hash-wasm", "dist/blake3.umd.min.js", ["createBLAKE3", "blake3"]));
writeFileSync(join(out, "xterm.mjs"),
  readFileSync(join(modules, "@xterm/xterm/lib/xterm.mjs"), "utf8").replace(/\/\/# sourceMappingURL=.*$/m, ""));
copyFileSync(join(modules, "@xterm/xterm/css/xterm.css"), join(out, "xterm.css"));
copyFileSync(join(modules, "@msgpack/msgpack/LICENSE"), join(out, "LICENSE.msgpack.txt"));
copyFileSync(join(modules, "hash-wasm/LICENSE"), join(out, "LICENSE.hash-wasm.txt"));
copyFileSync(join(modules, "@xterm/xterm/LICENSE"), join(out, "LICENSE.xterm.txt"));
const listing = ["@msgpack/msgpack", "hash-wasm", "@xterm/xterm"].map((n) => `${n} ${version(n)}`);
writeFileSync(join(out, "VERSIONS.txt"), listing.join("\n") + "\n");
console.log(`vendored into ${out}:\n  ${listing.join("\n  ")}`);
