// DiffuMatting for ComfyUI: the page fills filename tokens (%date:yyyy-MM-dd%, %Node name.widget%) in the
// Save Transparent PNG node's filename_prefix, as it does for core's own save nodes. The frontend does this
// only for a fixed list of core node types; here the same public helper is attached to this pack's node.
// Without the helper (another frontend), the node itself still fills %date:...% on the server.
import { app } from "../../scripts/app.js";

const SAVE_NODES = new Set(["DiffuMattingSaveRGBA"]);

function replaceTokens(value) {
  const fill = window.comfyAPI?.utils?.applyTextReplacements;
  return typeof fill === "function" ? fill(app, value) : value;
}

app.registerExtension({
  name: "DiffuMatting.FilenameTokens",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SAVE_NODES.has(nodeData?.name)) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === "filename_prefix");
      if (widget) widget.serializeValue = () => replaceTokens(widget.value);
      return result;
    };
  },
});
