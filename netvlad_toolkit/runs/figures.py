"""Pictures of a run: Recall@N curves of the evaluated variants, and query strips with their top retrievals."""

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from netvlad_toolkit.utils.commons import atomic_write  # noqa: E402

STRIP_TOP = 5
MATCH_HEIGHT = 240  # height of each picture in a drawing of matched patches
MATCH_COLOURS = ('gold', 'deepskyblue', 'magenta', 'lime')  # one per patch size
THUMB = (160, 120)  # width, height of each picture in a strip


def plot_recall_curves(records, path):
    """Recall@N for N = 1..25, one line per variant."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for record in records:
        curve = record['curve']
        axes.plot(range(1, len(curve) + 1), curve, marker='o', markersize=3,
                  label=f'{record["arch"]} {record["variant"]}')
    axes.set_xlabel('N (number of top database candidates)')
    axes.set_ylabel('Recall@N')
    axes.set_title(f'Recall@N on {records[0]["dataset"]} {records[0]["split"]}')
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc='lower right')
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format='png', dpi=120))
    plt.close(figure)


def framed(path, colour, caption):
    """A thumbnail of the image at `path` (a grey tile when there is none) with a coloured frame and a caption."""
    image = Image.open(path).convert('RGB').resize(THUMB) if path else Image.new('RGB', THUMB, 'lightgrey')
    canvas = Image.new('RGB', (THUMB[0] + 8, THUMB[1] + 26), 'white')
    canvas.paste(Image.new('RGB', (THUMB[0] + 8, THUMB[1] + 8), colour), (0, 0))
    canvas.paste(image, (4, 4))
    ImageDraw.Draw(canvas).text((4, THUMB[1] + 11), caption, fill='black')
    return canvas


def retrieval_strips(dataset, predictions, query_indices, path):
    """For each chosen query: the query, then its top retrievals framed green (within the positive distance) or red."""
    struct = dataset.db_struct
    rows = []
    for query in query_indices:
        tiles = [framed(dataset.paths[struct.numDb + query], 'grey', f'query {query}')]
        ranked = predictions[query][predictions[query] >= 0]  # -1: fewer candidates than places (protocol rules)
        for rank, db_index in enumerate(ranked[:STRIP_TOP], 1):
            metres = float(np.linalg.norm(struct.utmDb[db_index] - struct.utmQ[query]))
            colour = 'green' if metres <= struct.posDistThr else 'red'
            tiles.append(framed(dataset.paths[db_index], colour, f'#{rank}: {metres:.0f} m'))
        rows.append(tiles)
    save_sheet(rows, path)


def query_strip(query_path, retrieved_paths, captions, path):
    """One query and its retrievals in a row, each retrieval captioned (e.g. rank and similarity)."""
    tiles = [framed(query_path, 'grey', 'query')]
    tiles += [framed(image, 'steelblue', caption) for image, caption in zip(retrieved_paths, captions)]
    save_sheet([tiles], path)


def save_sheet(rows, path):
    """Rows of equally sized tiles pasted into one picture."""
    tile_w, tile_h = rows[0][0].size
    sheet = Image.new('RGB', (tile_w * max(len(tiles) for tiles in rows), tile_h * len(rows)), 'white')
    for y, tiles in enumerate(rows):
        for x, tile in enumerate(tiles):
            sheet.paste(tile, (x * tile_w, y * tile_h))
    atomic_write(path, lambda f: sheet.save(f, format='PNG'))


def patch_matches(query_path, query_grid, candidates, path):
    """Matched patches as Patch-NetVLAD's visualisation draws them: one row per candidate (path, feature-map grid
    (height, width), caption, per patch size (query centres [k, 2], candidate centres [k, 2]) in feature-map cells),
    the query on the left, the candidate on the right, a line between the centres of each matched pair, one colour
    per patch size."""
    rows = []
    for candidate_path, candidate_grid, caption, pairs in candidates:
        pictures = [Image.open(p).convert('RGB') for p in (query_path, candidate_path)]
        scaled = [picture.resize((round(picture.width * MATCH_HEIGHT / picture.height), MATCH_HEIGHT))
                  for picture in pictures]
        canvas = Image.new('RGB', (scaled[0].width + scaled[1].width, MATCH_HEIGHT + 18), 'white')
        canvas.paste(scaled[0], (0, 0))
        canvas.paste(scaled[1], (scaled[0].width, 0))
        draw = ImageDraw.Draw(canvas)
        for (query_points, candidate_points), colour in zip(pairs, MATCH_COLOURS):
            ends = [cells_to_pixels(points, grid, picture.size, left) for points, grid, picture, left in
                    ((query_points, query_grid, scaled[0], 0), (candidate_points, candidate_grid, scaled[1],
                                                                scaled[0].width))]
            for start, end in zip(*ends):
                draw.line([tuple(start), tuple(end)], fill=colour, width=1)
                for x, y in (start, end):
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
        draw.text((4, MATCH_HEIGHT + 4), caption, fill='black')
        rows.append([canvas])
    widest = max(row[0].width for row in rows)
    save_sheet([[pad_to(row[0], widest)] for row in rows], path)


def cells_to_pixels(points, grid, size, left):
    """Patch centres (x, y) [k, 2] in feature-map cells (grid: its (height, width)) as pixel positions in a picture
    of `size` (width, height) placed at x = left: each cell covers an equal share of the picture."""
    scale = np.array([size[0] / grid[1], size[1] / grid[0]])
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale + [left, 0]


def pad_to(picture, width):
    padded = Image.new('RGB', (width, picture.height), 'white')
    padded.paste(picture, (0, 0))
    return padded
