"""Search your own videos with a trained DGL: index a folder, query it by text or video, draw attention.

    python search_videos.py index  VIDEOS... --index IDX --clip ViT-B-32.pt --checkpoint ckpt.best.pth.tar
    python search_videos.py query  "a man is cooking" --index IDX -k 5 --html results.html
    python search_videos.py visualize clip.mp4 --index IDX --caption "a man is cooking" --out attention.png

See `python search_videos.py <command> --help` and the README section "Search your own videos".
"""
import sys

from retrieval.cli import main

if __name__ == "__main__":
    sys.exit(main())
