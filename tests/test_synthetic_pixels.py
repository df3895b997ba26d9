"""The synthetic renderer's pixels are pinned: a refactoring of sall/data/synthetic.py must keep them.

Why: the rendered pixels are part of the data fingerprint only through ``RENDER_VERSION``, so a change
of the drawing that does not bump it would silently reuse cached images and teachers of another data
set. These digests were computed with the renderer as of RENDER_VERSION 3, before ``render`` was split
into steps; any change of the random-draw order, a lesion, the compositing or the acquisition changes
them. If a change of the pictures is intended, bump ``RENDER_VERSION`` and recompute the digests.

The cases cover every task and grade, both eyes of a patient (mirrored geometry, shared traits),
several seeds, and the image sizes of the presets (32 smoke, 64 cpu, 128 gpu, 299 paper); together
they reach every lesion branch of the renderer, the random ones included (e.g. the tiny drusen of a
normal AMD eye, both kinds of DR neovessels, the exudate ring around a CNV membrane).
"""

from __future__ import annotations

import hashlib

import pytest

from sall.data.synthetic import RENDER_VERSION, image_id, render
from sall.tasks import TASKS

#: (index, seed) of the images rendered for every (task, grade); the first two are the two eyes of a patient.
CASES = ((0, 0), (1, 0), (5, 3), (12, 11), (33, 2), (2, 1), (7, 5), (20, 9))

#: sha256 over the concatenated uint8 bytes of the CASES' renderings (only the first two at 299 px).
DIGESTS: dict[tuple[str, int, int], str] = {
    ("dr", 0, 32): "a497151d63f4e52696d1addfaa27f9145c6344e19478ec4da1e1740bb80feecd",
    ("dr", 0, 64): "d72bfd9bbc681052ac2878bcefd6d402742f04b2bf448e50e5d525fbb8ecf873",
    ("dr", 0, 128): "07f10066981484fb7ce7f69e7f7055fd9aea523476bda43ccd98a89427bf8529",
    ("dr", 0, 299): "ebcee2b48d877ba92b661647754679102bd795fa99b077df060dc6d901c44e52",
    ("dr", 1, 32): "f7f39990a0d8cf80cf260aaaa5240c893f77c4447df221cddd29f89d573a40b1",
    ("dr", 1, 64): "fb87f55b4680e474757c5b8130d5ca9578b89b4137804e2b840f07e6e67bf6e3",
    ("dr", 1, 128): "88e8135d2aa18fde5bcd7898ef55aca94c78f9623816f1bf292338d56ea15d39",
    ("dr", 1, 299): "cce5b7e76d36165c6a67514094a4512732165fdc8f272b0fdc3cd94f57dac6f8",
    ("dr", 2, 32): "8328a1cfd59c631d85923be765d6059779d5bf4b557ce258e538b3421da36873",
    ("dr", 2, 64): "80334f1ba8e285e64d535aa8982d2795c5e0661be891e843adf0e4116af35360",
    ("dr", 2, 128): "a50b5e24708dc2b598800dcd849e925274e2b3bef3dd720bc864122d9614facd",
    ("dr", 2, 299): "0449f4ce71e5011d9c97a23954a681860f08ae3be9ea80ee75d1d38ea280a385",
    ("dr", 3, 32): "092d64b9b8f275ec9f7935c25b31aef7dad5812f4d8307058a466f9f0fb90f6c",
    ("dr", 3, 64): "ac7359055d6a5e56002087daa70daa9a42e9c18ff50e4da7eba2ee585500d908",
    ("dr", 3, 128): "b9b6580ce603e946ea200d35c98cf8492c3ef2f6c0b2a0488fa2c06a5dbcd683",
    ("dr", 3, 299): "dd474255915afd16a898b0f2df49d480e8472e1a0662fb2fc6bba447906848cf",
    ("dr", 4, 32): "91e58f4f52e742b7377156c5fdff814700b59547ad5c4f340aebade5560ec76d",
    ("dr", 4, 64): "5f12cf54cee5e43f2cee2289d93876a4272d3fa01514497c9592fa2c6404bf14",
    ("dr", 4, 128): "f2416bb29bfe4b22367635e74ddf855c83cee02149d2ac4171da651fdc22d44e",
    ("dr", 4, 299): "d352e3055338ba49acaa2648ed127ebb06debe044d224319252978c77fd1bfea",
    ("amd", 0, 32): "1b0a31dd91698845da099f097c52f30bd1be3171e96b014a61c3c4555511feb9",
    ("amd", 0, 64): "8f5bfa7743982008d7ad2cbcd02500aa0b93f39dac7a18306742bf9346dcd3de",
    ("amd", 0, 128): "7868fda2362012f3e0af4d9cbf3fe95985597c1e58fb5324156974ef8480fe0c",
    ("amd", 0, 299): "85ae161175728a172754d2a9f1b4a67356b28ec25b780e883c83d352932bd15d",
    ("amd", 1, 32): "91b3ca33749bc73ecba72c3f4f16c7c768cff623a1131eaf23bde4c197d5cd40",
    ("amd", 1, 64): "97d97d512e899a83b8feb50314a65038564a90aa79a795d364cb538db5a3ecda",
    ("amd", 1, 128): "86d03be4efa186bc27f464401f828f31bf567e9334327a57baa29b4f4daad054",
    ("amd", 1, 299): "ada36b9459d7fb7d63b0af4569b1243e16d9f08a29c9e4a6758c7fa0924bfbb2",
    ("amd", 2, 32): "8db22af831379c3ea6e58396e9065c0e116852e160ba7046609e70ed742e7fe4",
    ("amd", 2, 64): "f5c38b627a16dba65f5b695813894508ae34cf1b930b1b1e7f34892a7beedb0f",
    ("amd", 2, 128): "52092459be311d167c1e161a4f1cf0430e776e8a906555ef5f97ece987327c00",
    ("amd", 2, 299): "4f7601c5f94318193e3d98c558b3e52627b5e5f207df9bfeddcccbaab3bc6e5f",
    ("amd", 3, 32): "ab1b3bc9219183997280150363a0b91e2611ad38288ac718b9ec302ef556936e",
    ("amd", 3, 64): "56c1a96dbaff893106b49afa9425bc71c8a60d088629356c355919775d488af5",
    ("amd", 3, 128): "52c1c84c0846d1eb42cf000d7cd4feffb5aa3c365aee9da03c6a6574ba7b6444",
    ("amd", 3, 299): "deb8265171eef6152748aa40ffdb1cd6aa929a7f6a3956a9b3ad144360fe417c",
    ("arter", 0, 32): "210c3a14e91aef32eecb093822ec2ee4aac6447d2d3a3ece3bf594871749d5a7",
    ("arter", 0, 64): "20d9c364e62d5176cb9cbea771de9871ab11897d47bb0a015b588a2e4b023d1b",
    ("arter", 0, 128): "4e8b0012296f2276dd7f88584682b70bef3801dcdf3f5fc476b1223d6d4cdd60",
    ("arter", 0, 299): "c3df9f3553f3ae5c951767ec26720209940a37462cf28393cd5956f82b403004",
    ("arter", 1, 32): "d59010e61f457ab1cda522807b228e6f8dfa1b10f1f524aca97b7633e21f1c92",
    ("arter", 1, 64): "4f98dc684c70e9f99e15956b99ec9b0ae6d011ac5e00ff8805c5e550030eaa33",
    ("arter", 1, 128): "705c285e97ed40236359fd7efed9c48f4006922e9b6426b992e432dccdcbbd5b",
    ("arter", 1, 299): "c349849acaee569b8e2b67c20877f11fa260481fcd28967eb5da5e02532e9094",
}


def _digest(task: str, grade: int, size: int) -> str:
    h = hashlib.sha256()
    for index, seed in CASES if size != 299 else CASES[:2]:
        h.update(render(image_id(task, index, grade, seed), size).tobytes())
    return h.hexdigest()


def test_digests_cover_every_task_and_grade():
    want = {(t, g) for t, spec in TASKS.items() for g in range(spec.num_classes)}
    assert {(t, g) for t, g, _ in DIGESTS} == want
    assert RENDER_VERSION == 3, "the renderer changed version: recompute DIGESTS for the new pictures"


@pytest.mark.parametrize("task,grade,size", sorted(DIGESTS))
def test_render_pixels_unchanged(task, grade, size):
    assert _digest(task, grade, size) == DIGESTS[(task, grade, size)], (
        f"render({task}, grade {grade}, {size} px) draws other pixels than RENDER_VERSION 3 did"
    )
