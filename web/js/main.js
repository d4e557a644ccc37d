// main: the page's entry module. Each tab is one module, which wires its own part of index.html
// when it is imported; this one imports them, loads the model menu and opens the first tab.
//   overview.js  the pipeline and the token embeddings in 3-D
//   chat.js      conversations and streamed replies (settings.js the sliders, tokens.js each
//                token's tooltip); complete.js the Complete mode for base models
//   inspect.js   tokens, attention, the logit lens and activation flow, three tokenizers
//   compare.js   one prompt under several decoding strategies, the beam tree
//                sidebyside.js its other mode: one conversation with 2-4 models, side by side
//   arch.js      the Model tab: the served model's blocks, a calculator
//   prompts.js   the template library
//   arena.js     two replies shown blind, a vote, ratings
//   train.js     a job started from a recipe and a form of its settings, followed to its end
//   runs.js      loss curves and runs compared; registry.js the models on disk; leaderboard.js
//                the evaluations
//   data.js      the prepared datasets: counts, cleaning, document lengths, samples; uploads
// Shared by all: api.js (serve.py's API), dom.js (elements, tabs), canvas.js (HiDPI canvases,
// charts), models.js (the model menu).
import {$, guard, showTab, tabNames} from './dom.js';
import {loadModels} from './models.js';
import './overview.js';
import './chat.js';
import './complete.js';
import './inspect.js';
import './compare.js';
import './sidebyside.js';
import './arch.js';
import './prompts.js';
import './arena.js';
import './train.js';
import './runs.js';
import './data.js';

guard($('chat-status'), async () => {
  await loadModels();
  // a first visit lands on the overview; later ones on the chat, or on the tab in the address
  // (#inspect)
  const first = !localStorage.getItem('nanolab.visited');
  localStorage.setItem('nanolab.visited', '1');
  const asked = location.hash.slice(1);
  showTab(tabNames().includes(asked) ? asked : first ? 'overview' : 'chat');
});
