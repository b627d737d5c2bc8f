// DiffuMatting for ComfyUI: a checkerboard under the image previews of the pack's output nodes, so
// transparent outputs read as transparent instead of blending into the node's background.
//
// Two renderers, two ways:
// - the classic LiteGraph canvas: the checkerboard is painted in the node's onDrawBackground, under the
//   rectangles where the frontend draws the images;
// - the Vue node renderer ("Nodes 2.0", setting Comfy.VueNodes.Enabled): nodes are DOM elements
//   (.lg-node[data-node-id]) and previews are <img> elements, so a style sheet gives those images a
//   checkerboard background, sized to the image itself (not the letterbox around it).
// `checkerDraws` counts canvas draws and `drawnNodes` holds the ids of the nodes drawn, for the tests.
import { app } from "../../scripts/app.js";

const EXTENSION = "DiffuMatting.TransparentPreview";
const CELL = 8;
const LIGHT = "#cccccc";
const DARK = "#999999";
const STYLE_ID = "diffumatting-transparent-previews";
const previewTypes = new Set();
let pattern = null;

function checkerPattern(ctx) {
  if (pattern) return pattern;
  const c = document.createElement("canvas");
  c.width = c.height = CELL * 2;
  const g = c.getContext("2d");
  g.fillStyle = LIGHT;
  g.fillRect(0, 0, CELL * 2, CELL * 2);
  g.fillStyle = DARK;
  g.fillRect(0, 0, CELL, CELL);
  g.fillRect(CELL, CELL, CELL, CELL);
  pattern = ctx.createPattern(c, "repeat");
  return pattern;
}

// Top of the preview area: the image-preview widget's y, else below the node's last ordinary widget.
function previewTop(node) {
  const preview = node.widgets?.find((w) => w.name?.startsWith("$$"));
  const py = preview?.y ?? preview?.last_y;
  if (typeof py === "number") return py;
  let top = Math.max(node.inputs?.length ?? 0, node.outputs?.length ?? 0) * (LiteGraph.NODE_SLOT_HEIGHT ?? 20) + 6;
  for (const w of node.widgets ?? []) {
    const y = w.y ?? w.last_y;
    if (typeof y === "number") top = Math.max(top, y + (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT ?? 20) + 4);
  }
  return top;
}

// Where the frontend draws the images: the same fit as its preview (aspect kept, centred, never
// enlarged, 15 px kept for the size caption); for a grid of images, the rectangles it recorded.
function imageRects(node) {
  const imgs = node.imgs ?? [];
  const index = node.imageIndex ?? (imgs.length === 1 ? 0 : null);
  if (index == null) return (node.imageRects ?? []).map(([x, y, w, h]) => ({ x, y, w, h }));
  const img = imgs[index];
  if (!img?.naturalWidth) return [];
  const top = previewTop(node);
  const caption = app.extensionManager?.setting?.get?.("Comfy.Node.AllowImageSizeDraw") === false ? 0 : 15;
  const avail = node.size[1] - top - caption;
  if (avail <= 0) return [];
  const s = Math.min(node.size[0] / img.naturalWidth, avail / img.naturalHeight, 1);
  const w = img.naturalWidth * s, h = img.naturalHeight * s;
  return [{ x: (node.size[0] - w) / 2, y: top + (avail - h) / 2, w, h }];
}

// --- Vue node renderer: one style sheet with a rule per preview node of the pack ---------------------
function packNodeIds() {
  const ids = [];
  const visit = (graph) => {
    for (const node of graph?._nodes ?? graph?.nodes ?? []) {
      if (previewTypes.has(node.comfyClass ?? node.type)) ids.push(String(node.id));
      if (node.subgraph) visit(node.subgraph);
    }
  };
  visit(app.graph);
  return ids;
}

function cssString(value) {
  return `"${value.replace(/["\\]/g, "\\$&")}"`;
}

function refreshVueStyle() {
  let style = document.getElementById(STYLE_ID);
  if (!style) {
    style = document.createElement("style");
    style.id = STYLE_ID;
    document.head.appendChild(style);
  }
  const checker = `repeating-conic-gradient(${DARK} 0% 25%, ${LIGHT} 0% 50%) 0 0 / ${CELL * 2}px ${CELL * 2}px`;
  style.textContent = packNodeIds().map((id) => {
    const node = `.lg-node[data-node-id=${cssString(id)}]`;
    return `${node} div:has(> img) { display: flex; align-items: center; justify-content: center; }\n` +
      `${node} img { width: auto; height: auto; max-width: 100%; max-height: 100%; background: ${checker}; }`;
  }).join("\n");
}

let refreshQueued = false;
function queueRefresh() {
  if (refreshQueued) return;
  refreshQueued = true;
  setTimeout(() => {
    refreshQueued = false;
    refreshVueStyle();
  }, 0);
}

const extension = {
  name: EXTENSION,
  checkerDraws: 0,
  drawnNodes: new Set(),
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (String(nodeData?.category ?? "").startsWith("DiffuMatting") && nodeData.output_node) {
      previewTypes.add(nodeData.name);
    }
  },
  afterConfigureGraph() {
    queueRefresh();
  },
  nodeCreated(node) {
    if (!previewTypes.has(node.comfyClass ?? node.type)) return;
    queueRefresh();  // after the id is set (a loaded workflow assigns ids after creation)
    const removed = node.onRemoved;
    node.onRemoved = function (...args) {
      queueRefresh();
      return removed?.apply(this, args);
    };
    const draw = node.onDrawBackground;
    node.onDrawBackground = function (ctx, ...rest) {
      if (this.imgs?.length && !this.flags?.collapsed) {
        const rects = imageRects(this).filter((r) => r.w > 0 && r.h > 0);
        if (rects.length) {
          ctx.save();
          ctx.fillStyle = checkerPattern(ctx);
          for (const r of rects) ctx.fillRect(r.x, r.y, r.w, r.h);
          ctx.restore();
          extension.checkerDraws += 1;
          extension.drawnNodes.add(String(this.id));
        }
      }
      return draw?.call(this, ctx, ...rest);
    };
  },
};

app.registerExtension(extension);
