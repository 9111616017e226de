/**
 * kernelscope-highlight: a code cell whose first line starts with `%%bpf` is highlighted as C.
 *
 * The notebook gives every code cell the kernel's MIME type (Python); this plugin watches each
 * code cell's source and gives a cell magic's cell the MIME type of its language instead, so
 * JupyterLab's own language registry (CodeMirror 6's C from @codemirror/lang-cpp, bundled with
 * JupyterLab) highlights it. Nothing is bundled here but this file. When the magic line goes,
 * the cell gets the notebook's MIME type back.
 *
 * `%%bpftrace` is highlighted as C too: JupyterLab has no bpftrace or awk mode, and
 * bpftrace's probe bodies are C-like.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICellModel } from '@jupyterlab/cells';
import { IEditorLanguageRegistry } from '@jupyterlab/codemirror';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';

/** The C MIME type JupyterLab's language registry maps to @codemirror/lang-cpp's C. */
export const C_MIME = 'text/x-csrc';

/** Cell magics and the MIME type of their cells; the magic is a whole word (`%%bpf_x` is not `%%bpf`). */
const MAGICS: ReadonlyArray<[RegExp, string]> = [
  [/^%%bpftrace(?:\s|$)/, C_MIME],
  [/^%%bpf(?:\s|$)/, C_MIME]
];

/** The MIME type a cell's source asks for by its first line, or null for none. */
export function magicMime(source: string): string | null {
  for (const [magic, mime] of MAGICS) {
    if (magic.test(source)) {
      return mime;
    }
  }
  return null;
}

const ours = new Set(MAGICS.map(([, mime]) => mime));
// the MIME type the notebook gave each cell, restored when its magic line goes
const notebookMime = new WeakMap<ICellModel, string>();
const watched = new WeakSet<ICellModel>();

/**
 * Gives the cell the MIME type its first line asks for, once JupyterLab has loaded the languages
 * of both MIME types: the editor applies each change of MIME type when its language has loaded,
 * so a Python still loading when C is set would otherwise land last and win.
 */
async function apply(model: ICellModel, languages: IEditorLanguageRegistry): Promise<void> {
  const want = (): string => magicMime(model.sharedModel.getSource()) ?? notebookMime.get(model) ?? model.mimeType;
  const mime = want();
  if (model.mimeType === mime) {
    return;
  }
  await Promise.all([languages.getLanguage(mime), languages.getLanguage(model.mimeType)]);
  if (want() === mime && model.mimeType !== mime) {
    model.mimeType = mime;
  }
}

function watch(model: ICellModel, languages: IEditorLanguageRegistry): void {
  if (model.type !== 'code' || watched.has(model)) {
    return;
  }
  watched.add(model);
  if (!ours.has(model.mimeType)) {
    notebookMime.set(model, model.mimeType);
  }
  const update = (): void => {
    apply(model, languages).catch(reason => console.error('kernelscope-highlight:', reason));
  };
  model.contentChanged.connect(update);
  // the notebook sets every cell's MIME type again when the kernel's language arrives
  model.mimeTypeChanged.connect((_, change) => {
    if (!ours.has(change.newValue)) {
      notebookMime.set(model, change.newValue);
      update();
    }
  });
  update();
}

function track(panel: NotebookPanel, languages: IEditorLanguageRegistry): void {
  const connect = (): void => {
    const cells = panel.content.model?.cells;
    if (!cells) {
      return;
    }
    for (let i = 0; i < cells.length; i++) {
      watch(cells.get(i), languages);
    }
    cells.changed.connect((_, change) => {
      for (const model of change.newValues) {
        watch(model, languages);
      }
    });
  };
  panel.content.modelChanged.connect(connect);
  connect();
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'kernelscope-highlight:plugin',
  description: 'Highlights %%bpf and %%bpftrace cells as C.',
  autoStart: true,
  requires: [INotebookTracker, IEditorLanguageRegistry],
  activate: (_app: JupyterFrontEnd, tracker: INotebookTracker, languages: IEditorLanguageRegistry): void => {
    tracker.forEach(panel => track(panel, languages));
    tracker.widgetAdded.connect((_, panel) => track(panel, languages));
  }
};

export default plugin;
