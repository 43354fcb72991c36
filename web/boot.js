// Loads the WebAssembly client. Kept as a file (not an inline script) so that the pages' CSP
// can forbid inline scripts.
import init, { game_state } from "./rallypoint-client.js";

// Read-only view of the current match, for the devtools console and end-to-end tests.
window.rallypoint = { state: () => JSON.parse(game_state()) };

init({ module_or_path: new URL("./rallypoint-client_bg.wasm", import.meta.url) }).catch((error) => {
  console.error(error);
  const status = document.getElementById("status");
  if (status) {
    status.textContent = "This browser could not start the game client.";
    status.dataset.state = "failed";
  }
});
