"""Generate the tiny-intent data: Korean banking questions labelled with ten intents, deterministically.

The output is committed as data/tiny-intent/inquiries.csv, a `text,label` file whose labels are integer ids, as
a user's export often is; configs/tiny-intent.yaml maps them to names with `label_names` (the order of INTENTS)
and wraps the text in an instruction with `prompt_template`. Two intents are deliberately close, as in
Banking77: 카드도착 (`card_arrival`: my card has not come) and 배송기간 (`card_delivery_estimate`: how long will it
take), which share words. The labels are Korean words of 2-7 tokens of the tiny tokenizer (Banking77's English
names are 12-34 byte tokens each, more than a 2-layer model learns in minutes). Regenerate with
`python -m loraflow.tiny.intentdata`.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

OUT_FILE = Path("data/tiny-intent/inquiries.csv")
SEED = 24
ROWS_PER_INTENT = 30

# Intent (its Banking77 name in BANKING77) -> the core of a question (each framed several ways below).
INTENTS: dict[str, list[str]] = {
    "카드도착": ["카드가 아직 도착하지 않았어요", "주문한 카드를 아직 못 받았어요", "카드가 안 와요",
                     "배송된다던 카드가 오지 않았습니다", "2주 전에 신청한 카드가 아직 안 왔어요",
                     "카드 배송이 완료라는데 받지 못했어요"],
    "배송기간": ["카드 배송은 보통 며칠 걸리나요", "새 카드를 받으려면 얼마나 기다려야 하나요",
                               "카드가 언제쯤 도착할 예정인가요", "카드 배송 예상 기간을 알려 주세요",
                               "카드 신청하면 배송까지 몇 주 걸려요", "해외로 카드 배송하면 며칠 걸리나요"],
    "카드분실": ["카드를 잃어버렸어요", "지갑을 도난당해서 카드가 없어요", "카드를 분실했습니다",
                            "누가 제 카드를 훔쳐 간 것 같아요", "카드를 어디에 두었는지 모르겠어요",
                            "분실한 카드를 정지하고 싶어요"],
    "비밀번호변경": ["카드 비밀번호를 바꾸고 싶어요", "PIN 번호를 변경하려면 어떻게 하나요", "비밀번호 변경 방법",
                   "카드 핀 번호를 새로 정하고 싶어요", "비밀번호를 다른 숫자로 바꿀 수 있나요",
                   "핀 번호 재설정은 어디서 하나요"],
    "환율": ["오늘 달러 환율이 얼마예요", "환전할 때 어떤 환율이 적용되나요", "유로 환율을 알려 주세요",
                      "환율은 언제 기준인가요", "엔화로 바꾸면 환율이 어떻게 되나요",
                      "해외 결제 환율은 어떻게 정해지나요"],
    "충전실패": ["충전이 실패했어요", "잔액 충전이 안 됩니다", "계좌 충전을 했는데 오류가 났어요",
                      "충전 버튼을 눌렀는데 실패라고 떠요", "카드로 충전이 되지 않아요",
                      "충전 시도가 계속 거절돼요"],
    "송금미도착": ["송금했는데 상대방이 못 받았대요", "보낸 돈이 받는 사람 계좌에 없어요",
                                           "이체가 완료됐는데 친구가 입금이 안 됐대요",
                                           "수취인이 돈을 받지 못했다고 합니다",
                                           "해외 송금이 상대에게 도착하지 않았어요",
                                           "어제 보낸 이체가 아직 상대방에게 안 갔어요"],
    "출금수수료": ["현금 인출 수수료가 붙었어요", "ATM에서 돈을 뽑았는데 수수료가 나갔어요",
                               "출금 수수료는 얼마인가요", "현금 인출할 때 왜 요금이 부과되나요",
                               "인출 수수료가 청구됐는데 이유가 뭔가요", "무료 출금 한도가 있나요"],
    "계좌해지": ["계좌를 해지하고 싶어요", "계정을 완전히 삭제하려면 어떻게 하나요", "회원 탈퇴하고 싶습니다",
                          "이 은행 계좌를 닫고 싶어요", "계좌 해지 절차를 알려 주세요",
                          "더 이상 안 쓰는 계정을 없애 주세요"],
    "결제거절": ["카드 결제가 거절됐어요", "가게에서 카드가 승인되지 않았어요",
                              "온라인 결제가 계속 거부됩니다", "카드로 결제하려는데 승인 거절이 떠요",
                              "식당에서 카드 결제가 안 됐어요", "결제가 왜 거절됐는지 알고 싶어요"],
}
BANKING77 = ["card_arrival", "card_delivery_estimate", "lost_or_stolen_card", "change_pin", "exchange_rate",
             "top_up_failed", "transfer_not_received_by_recipient", "cash_withdrawal_charge", "terminate_account",
             "declined_card_payment"]
FRAMES = ["{q}.", "{q}?", "안녕하세요, {q}.", "{q}. 도와주세요.", "급해요. {q}.", "문의드립니다. {q}."]


def rows() -> list[dict[str, object]]:
    """ROWS_PER_INTENT distinct (core x frame) questions per intent, ids in the order of INTENTS, shuffled."""
    rng = random.Random(SEED)
    out: list[dict[str, object]] = []
    for label, cores in enumerate(INTENTS.values()):
        combos = [frame.format(q=core) for core in cores for frame in FRAMES]
        out += [{"text": text, "label": label} for text in rng.sample(combos, ROWS_PER_INTENT)]
    rng.shuffle(out)
    return out


def write(out_file: Path = OUT_FILE) -> None:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows())


if __name__ == "__main__":
    write()
