// DiffuMatting for ComfyUI: draw a checkerboard under the image previews of the pack's nodes, so
// transparent outputs read as transparent instead of blending into the node's background.
import { app } from "../../scripts/app.js";

const EXTENSION = "DiffuMatting.TransparentPreview";
const CELL = 8;
const previewTypes = new Set();
let pattern = null;

function checkerPattern(ctx) {
  if (pattern) return pattern;
  const c = document.createElement("canvas");
  c.width = c.height = CELL * 2;
  const g = c.getContext("2d");
  g.fillStyle = "#cccccc";
  g.fillRect(0, 0, CELL * 2, CELL * 2);
  g.fillStyle = "#999999";
  g.fillRect(0, 0, CELL, CELL);
  g.fillRect(CELL, CELL, CELL, CELL);
  pattern = ctx.createPattern(c, "repeat");
  return pattern;
}

// Top of the preview area: below the node's last ordinary widget.
function previewTop(node) {
  let top = LiteGraph.NODE_TITLE_HEIGHT ? 0 : 0;
  const slots = Math.max(node.inputs?.length ?? 0, node.outputs?.length ?? 0);
  top = Math.max(top, slots * (LiteGraph.NODE_SLOT_HEIGHT ?? 20) + 6);
  for (const w of node.widgets ?? []) {
    if (w.name?.startsWith("$$")) continue;
    const y = w.y ?? w.last_y;
    if (typeof y === "number") top = Math.max(top, y + (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT ?? 20) + 4);
  }
  return top;
}

// The rectangle the frontend fits one image into (aspect kept, centred), or the whole area for grids.
function imageRect(node, top) {
  const area = { x: 0, y: top, w: node.size[0], h: node.size[1] - top };
  const imgs = node.imgs ?? [];
  const index = node.imageIndex ?? (imgs.length === 1 ? 0 : null);
  const img = index == null ? null : imgs[index];
  if (!img || !img.naturalWidth || area.h <= 0) return area;
  const s = Math.min(area.w / img.naturalWidth, area.h / img.naturalHeight);
  const w = img.naturalWidth * s, h = img.naturalHeight * s;
  return { x: (area.w - w) / 2, y: top + (area.h - h) / 2, w, h };
}

const extension = {
  name: EXTENSION,
  checkerDraws: 0,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (String(nodeData?.category ?? "").startsWith("DiffuMatting") && nodeData.output_node) {
      previewTypes.add(nodeData.name);
    }
  },
  nodeCreated(node) {
    if (!previewTypes.has(node.comfyClass ?? node.type)) return;
    const draw = node.onDrawBackground;
    node.onDrawBackground = function (ctx, ...rest) {
      if (this.imgs?.length && !this.flags?.collapsed) {
        const r = imageRect(this, previewTop(this));
        if (r.w > 0 && r.h > 0) {
          ctx.save();
          ctx.fillStyle = checkerPattern(ctx);
          ctx.fillRect(r.x, r.y, r.w, r.h);
          ctx.restore();
          extension.checkerDraws += 1;
        }
      }
      return draw?.call(this, ctx, ...rest);
    };
  },
};

app.registerExtension(extension);
